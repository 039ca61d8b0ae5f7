"""The first release's layers as presets of the one layer (private; public as ``cl.*``).

:class:`BoundaryCorrection` and :class:`ConservationProjection` are
:class:`~constraint_layers.layer.ConstraintLayer` restricted to one family each, with the
signatures of the first release.
"""

from __future__ import annotations

from typing import Any

from ._engine.faces import conditions as boundary_conditions
from .conservation.constraint import constraints_of
from .layer import ConstraintLayer

__all__ = ["BoundaryCorrection", "ConservationProjection"]


class BoundaryCorrection(ConstraintLayer):
    """Wrap a grid model so that its outputs satisfy boundary conditions exactly (BOON's output
    step; with ``mode="refine"`` also its kernel refinement).

    ``cl.BoundaryCorrection(model, bcs, **options)`` is the one layer
    (:class:`ConstraintLayer`) restricted to boundary conditions; see it for the options.

    Parameters
    ----------
    model : nn.Module
        A model whose output is (or, through its adapter, contains) a channel-first grid.
    constraints : BoundaryCondition or sequence of them
        Applied in order; where two meet the later one holds.
    rcond : float, default 1e-2
        ``mode="refine"``: Tikhonov parameter of the boundary-block solve, relative to the
        largest Frobenius norm of its per-frequency blocks (0: the pseudo-inverse); directions
        far above it are inverted to rounding, those near or below it are damped instead of
        blowing up. The default is the trained-accuracy optimum measured on heat and Burgers
        (``examples/boundary_paper/RESULTS.md``, "rcond"): 1e-5, closer to exact elimination,
        trained 6x to 16x worse than the plain FNO there.
    refresh : int, default 1
        ``mode="refine"``: 1 gives exact gradients (each refined layer's boundary block is
        rebuilt inside the autograd graph at every training call, in closed form from the
        weights for neuraloperator spectral convolutions); ``k > 1`` reuses a frozen one for
        ``k`` weight changes, in training and inference alike: approximate gradients, and no
        faster for neuraloperator layers (the default evaluates them in one pass; a frozen
        block needs the layer's own forward). Without gradients it is reused while the weights
        are equal (compared by value).
    kernel_grad : {"exact", "detached"}, default "exact"
        ``mode="refine"``: ``"detached"`` rebuilds the boundary block at every call but treats
        it (and the boundary-to-interior coupling) as a constant for autograd: the "frozen"
        variant of the boundary-paper study (it trains worse; kept for comparisons).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> net = torch.nn.Conv1d(2, 1, 3, padding=1)
    >>> model = cl.BoundaryCorrection(net, [cl.Dirichlet(0.0)])
    >>> out = model(torch.randn(8, 2, 32))
    >>> bool((out[..., 0] == 0).all() and (out[..., -1] == 0).all())
    True
    >>> cl.unwrap(model) is net
    True

    References
    ----------
    Saad et al., "Guiding continuous operator learning through physics-based boundary
    constraints", ICLR 2023.
    """

    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        items = boundary_conditions(constraints, call)
        if not items:
            raise ValueError(f"{call}: expected at least one boundary condition, got none.")
        return items


class ConservationProjection(ConstraintLayer):
    """Wrap a model so that its outputs satisfy conservation constraints exactly (ProbConserv;
    HardC for deterministic outputs).

    ``cl.ConservationProjection(model, constraints, **options)`` is the one layer
    (:class:`ConstraintLayer`) restricted to conservation constraints; see it for the options.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> class Head(torch.nn.Module):  # returns (mean, variance) on a (batch, 1, x) grid
    ...     def forward(self, x):
    ...         return torch.sin(x), 0.1 + x**2
    >>> model = cl.wrap(Head(), cl.Conservation.integral(0.0, extent=2.0))
    >>> mean, var = model(torch.linspace(0, 2, 21).reshape(1, 1, 21))
    >>> float(cl.metrics.conservation_error(mean, model.constraints[0]).abs().max()) < 1e-6
    True

    References
    ----------
    Hansen et al., "Learning Physical Models that Can Respect Conservation Laws", ICML 2023,
    arXiv:2302.11002.
    """

    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        return constraints_of(constraints, call)
