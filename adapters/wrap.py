"""``wrap`` and ``unwrap``: add constraints to a model with one call, and take them off again."""

from __future__ import annotations

from typing import Any

from torch import nn

from constraint_layers.layer import BoundaryCorrection, ConservationProjection, ConstraintLayer
from constraint_layers.rows import FAMILIES

from ._registry import find

__all__ = ["unwrap", "wrap"]


def wrap(model: nn.Module, *constraints: Any, **options: Any) -> ConstraintLayer:
    """Add exact constraints to ``model``; returns an ``nn.Module`` wrapping it.

    Any mix of families in one call: boundary conditions and conservation constraints are
    enforced jointly, every row exact (see :class:`~constraint_layers.ConstraintLayer`). One
    family alone gives the preset of the first release (a
    :class:`~constraint_layers.BoundaryCorrection` or a
    :class:`~constraint_layers.ConservationProjection`), with the same numbers. The adapter
    registered for the model's type decides how the model is called and where the prediction sits
    in its output.

    Parameters
    ----------
    model : nn.Module
        The model to wrap; ``wrapped.model`` is this very object (not a copy).
    *constraints
        Boundary conditions and / or conservation constraints.
    **options
        Keyword options of the layer (``spacing``, ``lift``, ``normalizer``, ``mode``, ``noise``,
        ...). ``adapter=`` overrides the registry's choice (e.g. an adapter with settings).

    Returns
    -------
    ConstraintLayer
        The wrapper.

    Raises
    ------
    TypeError
        ``model`` is not an ``nn.Module``, or an argument is not a constraint.
    NoAdapterError
        No adapter is registered for the model's type.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> net = torch.nn.Conv2d(1, 1, 3, padding=1)
    >>> wrapped = cl.wrap(net, cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1))
    >>> wrapped(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 1, 16, 16])
    >>> cl.unwrap(wrapped) is net
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"wrap: expected the model to be a torch.nn.Module, got {type(model).__name__}. "
            "Wrap a plain function in an nn.Module (a subclass whose forward calls it) first."
        )
    if not constraints:
        raise ValueError(
            "wrap: expected at least one constraint after the model, e.g. "
            "cl.wrap(model, cl.Dirichlet(0.0)); got none."
        )
    for c in constraints:
        if getattr(type(c), "family", None) not in FAMILIES:
            raise TypeError(
                "wrap: expected constraints (cl.Dirichlet, cl.Neumann, cl.Periodic, "
                "cl.Conservation, cl.Conservation.integral, cl.Bounds, cl.DivergenceFree, "
                f"cl.LinearPDE, cl.Continuity, cl.NormalComponent), got {type(c).__name__}."
            )
    adapter = options.pop("adapter", None) or find(model)
    families = {c.family for c in constraints}
    if families == {"boundary"}:
        return BoundaryCorrection(model, list(constraints), adapter=adapter, **options)
    if families == {"conservation"}:
        return ConservationProjection(model, list(constraints), adapter=adapter, **options)
    return ConstraintLayer(model, list(constraints), adapter=adapter, **options)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The model inside a wrapper: the very object that was wrapped.

    Hooks the wrapper placed on the model (kernel refinement) are removed, so the model behaves
    exactly as before wrapping; its parameters are the same objects, so optimizers stay valid.

    Raises
    ------
    TypeError
        ``wrapped`` is not a constraint layer.
    """
    if not isinstance(wrapped, ConstraintLayer):
        raise TypeError(
            "unwrap: expected a wrapper made by cl.wrap (a ConstraintLayer), got "
            f"{type(wrapped).__name__}."
        )
    return wrapped.release()
