"""Local constraints: one row per grid node (divergence-free fields, continuity, any linear
differential constraint with constant coefficients).

:class:`LinearPDE` is the general form, on a channel-first grid output
``(batch, channels, d1, ..., dn)``::

    sum_k a_k D_k u_{c_k} = f        at every node,

each ``D_k`` a first or second derivative along one spatial axis (the operators of
``constraint_layers.local.stencils``, stated exactly there). :class:`DivergenceFree` and
:class:`Continuity` are presets. Their rows are stated as a structured operator (stencil or
Fourier symbol), never as a dense matrix: :meth:`LinearPDE.rows` returns :class:`LocalRows`,
tagged ``structure = "local"``, which the engine dispatches to the local solvers
(:mod:`constraint_layers.local.solve`).

Grids: a wall axis holds both end nodes (spacing ``extent / (n - 1)``, as everywhere in the
library); a periodic axis holds no repeated end node (spacing ``extent / n``). A fixed
``spacing`` is used as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._grid import resolve_spacing
from .._values import check_value, evaluate_value
from ..errors import GridError
from ..rows import DEFAULT_GRID, GridSpec
from .operator import LocalOperator, Term
from .stencils import STENCILS, min_nodes

__all__ = ["Continuity", "DivergenceFree", "LinearPDE", "LocalRows", "Term"]

F64 = torch.float64


class LocalRows(NamedTuple):
    """Rows ``C u = f``, one per node, as an operator: ``structure = "local"``.

    ``operator``: the :class:`~constraint_layers.local.operator.LocalOperator` ``C``;
    ``rhs``: (batch, d1, ..., dn) float64.
    """

    operator: LocalOperator
    rhs: Tensor

    #: The structure tag the engine dispatches on.
    @property
    def structure(self) -> str:
        return "local"

    @property
    def num_rows(self) -> int:
        return self.operator.num_rows

    def residual(self, u: Tensor) -> Tensor:
        """``C u - f`` for ``u`` (batch, channels, *grid): (batch, M) float64."""
        return (self.operator.apply(u.to(F64)) - self.rhs.to(u.device)).flatten(1)

    def relative_residual(self, u: Tensor) -> Tensor:
        """``|C u - f| / (row_scale max|u| + |f|)`` per row: (batch, M) float64."""
        size = u.detach().to(F64).abs().flatten(1).amax(1, keepdim=True)
        scale = self.operator.row_scale() * size + self.rhs.to(u.device).abs().flatten(1)
        return self.residual(u).abs() / (scale + torch.finfo(F64).tiny)

    def dense(self) -> Tensor:
        """The dense float64 ``C`` (M, channels * prod(grid)), by applying it to unit vectors
        (small grids: tests and references)."""
        n = math.prod(self.operator.shape)
        eye = torch.eye(n, dtype=F64).reshape(n, *self.operator.shape)
        return self.operator.apply(eye).reshape(n, -1).T


def _check_terms(terms: Any, call: str) -> tuple[Term, ...]:
    if isinstance(terms, (Term, tuple)) and len(terms) and not isinstance(terms[0], (tuple, Term)):
        terms = [terms]
    out = []
    for t in terms:
        try:
            a, c, ax, *rest = t
        except (TypeError, ValueError):
            raise TypeError(
                f"{call}: each term must be (coefficient, channel, axis[, order]) or "
                f"cl.Term(...), got {t!r}."
            ) from None
        order = rest[0] if rest else 1
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
            raise ValueError(f"{call}: a term's coefficient must be a finite number, got {a!r}.")
        for name, v in (("channel", c), ("axis", ax)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{call}: a term's {name} must be an int, got {v!r}.")
        if order not in (1, 2) or isinstance(order, bool):
            raise ValueError(f"{call}: a term's derivative order must be 1 or 2, got {order!r}.")
        if a != 0:
            out.append(Term(float(a), c, ax, int(order)))
    if not out:
        raise ValueError(f"{call}: expected at least one term with a non-zero coefficient.")
    return tuple(out)


class LinearPDE:
    """A linear differential constraint at every node: ``sum_k a_k D_k u_{c_k} = f``.

    Parameters
    ----------
    terms : sequence of (coefficient, channel, axis[, order]) or :class:`Term`
        ``coefficient * d^order u[channel] / d x_axis^order``; ``axis`` counts spatial axes
        (0: the first after the channels); ``order`` 1 (default) or 2.
    value : float, Tensor, callable or Given, default 0.0
        The right-hand side ``f``: a number, a tensor broadcastable to ``(batch, d1, ..., dn)``,
        a callable of the model input returning one, or ``cl.Given("name")``.
    periodic : bool or sequence of bool, default False
        Per spatial axis (one bool: all): whether the axis wraps around (no repeated end node).
    stencil : {"gradient", "spectral"}, default "gradient"
        ``"gradient"``: the stencil of ``torch.gradient(edge_order=2)`` (second-order central
        inside, second-order one-sided at walls; central and wrapping on periodic axes; second
        derivatives: the three-point stencil inside, four-point one-sided at walls).
        ``"spectral"``: Fourier differentiation (every differentiated axis periodic). The
        operators are stated exactly in ``constraint_layers.local.stencils``.

    Notes
    -----
    Deterministic outputs move by the Euclidean projection onto the rows; Gaussian outputs with
    a diagonal variance are conditioned on them. Every differentiated axis periodic: one
    projection per wavenumber by FFT (exact). With walls: conjugate gradients preconditioned by
    the separable fast solve (float64; stopped on the rows' relative residual, 1e-13); the
    backward is one more solve. With ``cl.Dirichlet`` walls in the same call the Dirichlet
    nodes are held and the rows act on the others.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> heat = cl.LinearPDE([(1.0, 0, 0, 1), (-0.1, 0, 1, 2)])  # u_t - 0.1 u_xx = 0 on (t, x)
    >>> y = cl.functional.enforce_local(torch.randn(2, 1, 9, 12, dtype=torch.float64), heat)
    >>> bool(heat.rows(y.shape).relative_residual(y).max() < 1e-10)
    True
    """

    family: ClassVar[str] = "local"
    structure: ClassVar[str] = "local"
    value_attr: ClassVar[str] = "value"

    def __init__(
        self,
        terms: Sequence[Any],
        value: Any = 0.0,
        *,
        periodic: bool | Sequence[bool] = False,
        stencil: str = "gradient",
    ) -> None:
        call = type(self).__name__
        self.terms = _check_terms(terms, call) if terms is not None else None
        self.value = check_value(value, call, "right-hand side", " broadcastable to (batch, *grid)")
        self.periodic = _check_periodic(periodic, call)
        if stencil not in STENCILS:
            raise ValueError(f"{call}: stencil must be one of {STENCILS}, got {stencil!r}.")
        if stencil == "spectral" and self.periodic is False:
            raise ValueError(
                f"{call}: stencil='spectral' differentiates periodic fields; pass periodic=True "
                "(or use the default stencil='gradient' for walls)."
            )
        self.stencil = stencil

    def __repr__(self) -> str:
        opts = "" if self.periodic is False else f", periodic={self.periodic}"
        opts += "" if self.stencil == "gradient" else f", stencil={self.stencil!r}"
        val = "" if isinstance(self.value, float) and self.value == 0 else f", value={self.value!r}"
        return f"{type(self).__name__}({list(self.terms)!r}{val}{opts})"

    def _terms(self, shape: Sequence[int], call: str) -> tuple[Term, ...]:
        return self.terms

    def operator(self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID) -> LocalOperator:
        """The operator ``C`` on an output of ``shape`` (batch, channels, d1, ..., dn)."""
        call = repr(self)
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3:
            raise GridError(
                f"{call}: expected a channel-first grid (batch, channels, d1, ..., dn), got shape "
                f"{shape}."
            )
        d = len(shape) - 2
        terms = self._terms(shape, call)
        per = self.periodic
        periodic = (per,) * d if isinstance(per, bool) else per
        if len(periodic) != d:
            raise GridError(
                f"{call}: periodic gives {len(periodic)} axes, the output has {d} spatial axes."
            )
        for t in terms:
            if not 0 <= t.channel < shape[1]:
                raise GridError(
                    f"{call}: channel {t.channel} is out of range for an output with {shape[1]} "
                    "channel(s)."
                )
            if not 0 <= t.axis < d:
                raise GridError(
                    f"{call}: axis {t.axis} is out of range for an output with {d} spatial "
                    "axis(es) (axis counts spatial axes, 0 is the first after the channels)."
                )
            need = min_nodes(t.order, periodic[t.axis])
            if shape[2 + t.axis] < need:
                raise GridError(
                    f"{call}: spatial axis {t.axis} has {shape[2 + t.axis]} node(s); the "
                    f"derivative of order {t.order} there needs at least {need}."
                )
            if self.stencil == "spectral" and not periodic[t.axis]:
                raise GridError(
                    f"{call}: stencil='spectral' needs every differentiated axis periodic; "
                    f"axis {t.axis} is not."
                )
        grid_shape = shape[2:]
        walls = resolve_spacing(grid_shape, spacing=grid.spacing, extent=grid.extent,
                                endpoint=grid.endpoint, call=call)  # fmt: skip
        wraps = resolve_spacing(grid_shape, spacing=grid.spacing, extent=grid.extent,
                                endpoint=False, call=call)  # fmt: skip
        hs = tuple(wraps[a] if periodic[a] else walls[a] for a in range(d))
        return LocalOperator(terms, shape[1:], hs, self.stencil, periodic)

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> LocalRows:
        """The rows on an output of ``shape``: the operator and the right-hand side
        (batch, d1, ..., dn) float64."""
        op = self.operator(shape, grid=grid)
        call = repr(self)
        f = evaluate_value(self.value, inputs, call, "right-hand side")
        target = (int(shape[0]), *op.grid)
        if isinstance(f, Tensor):
            try:
                f = torch.broadcast_to(f.to(F64), target)
            except RuntimeError:
                raise GridError(
                    f"{call}: the right-hand side has shape {tuple(f.shape)}; expected a shape "
                    f"broadcastable to (batch, d1, ..., dn) = {target}."
                ) from None
        else:
            f = torch.full(target, float(f), dtype=F64)
        return LocalRows(op, f)

    def residual(self, y: Tensor, inputs: Any = None, *, grid: GridSpec = DEFAULT_GRID) -> Tensor:
        """``C y - f`` on a grid output: (batch, d1, ..., dn) float64."""
        rows = self.rows(y.shape, grid=grid, inputs=inputs)
        return rows.residual(y.to(F64)).reshape(rows.rhs.shape)


def _check_periodic(periodic: Any, call: str) -> bool | tuple[bool, ...]:
    if isinstance(periodic, bool):
        return periodic
    if isinstance(periodic, Sequence) and all(isinstance(p, bool) for p in periodic):
        return tuple(periodic)
    raise TypeError(
        f"{call}: periodic must be a bool or a sequence of bools (one per spatial axis), got "
        f"{periodic!r}."
    )


class DivergenceFree(LinearPDE):
    """A divergence-free vector field: ``sum_j d u_{channels[j]} / d x_j = 0`` at every node.

    Parameters
    ----------
    channels : sequence of int, default (0, 1)
        The field's components, one per spatial axis, in axis order (2D and 3D).
    periodic, stencil
        As for :class:`LinearPDE`; the default is the stencil of
        ``torch.gradient(spacing=h, edge_order=2)`` for each component along its axis.
    value : default 0.0
        A prescribed divergence (a source), as for :class:`LinearPDE`.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> model = cl.wrap(torch.nn.Identity(), cl.DivergenceFree(periodic=True))
    >>> u = model(torch.randn(2, 2, 16, 16, dtype=torch.float64))
    >>> div = sum(torch.gradient(u[:, j], dim=j + 1)[0] for j in range(2))  # (inside)
    >>> bool(div[:, 1:-1, 1:-1].abs().max() < 1e-10)
    True
    """

    def __init__(
        self,
        channels: Sequence[int] = (0, 1),
        *,
        periodic: bool | Sequence[bool] = False,
        stencil: str = "gradient",
        value: Any = 0.0,
    ) -> None:
        chans = tuple(channels)
        if not chans or any(isinstance(c, bool) or not isinstance(c, int) for c in chans):
            raise TypeError(
                f"DivergenceFree: channels must be a sequence of ints (one per spatial axis), "
                f"got {channels!r}."
            )
        if len(set(chans)) != len(chans):
            raise ValueError(f"DivergenceFree: channels must be distinct, got {chans}.")
        self.channels = chans
        super().__init__(None, value, periodic=periodic, stencil=stencil)

    def __repr__(self) -> str:
        opts = "" if self.periodic is False else f", periodic={self.periodic}"
        opts += "" if self.stencil == "gradient" else f", stencil={self.stencil!r}"
        return f"DivergenceFree(channels={self.channels}{opts})"

    def _terms(self, shape: Sequence[int], call: str) -> tuple[Term, ...]:
        d = len(shape) - 2
        if d != len(self.channels):
            raise GridError(
                f"{call}: the field has {len(self.channels)} component(s) (channels "
                f"{self.channels}), one per spatial axis, but the output has {d} spatial "
                f"axis(es) (shape {tuple(shape)})."
            )
        return tuple(Term(1.0, c, j, 1) for j, c in enumerate(self.channels))


class Continuity(LinearPDE):
    """Local conservation on a space-time grid: ``d rho / dt + sum_j d F_j / d x_j = f`` at every
    node (the finite-difference form of ``u_t + F_x = 0``).

    Parameters
    ----------
    density : int, default 0
        The channel of the conserved density ``rho``.
    flux : int or sequence of int, default 1
        The channel(s) of the flux, one per spatial axis other than ``time_axis``, in axis order.
    time_axis : int, default 0
        The spatial axis of the output that is time.
    periodic, stencil, value
        As for :class:`LinearPDE` (time is usually not periodic: pass one bool per axis).
    """

    def __init__(
        self,
        density: int = 0,
        flux: int | Sequence[int] = 1,
        *,
        time_axis: int = 0,
        periodic: bool | Sequence[bool] = False,
        stencil: str = "gradient",
        value: Any = 0.0,
    ) -> None:
        self.density = density
        self.flux = (flux,) if isinstance(flux, int) else tuple(flux)
        self.time_axis = time_axis
        super().__init__(None, value, periodic=periodic, stencil=stencil)

    def __repr__(self) -> str:
        opts = "" if self.periodic is False else f", periodic={self.periodic}"
        return (
            f"Continuity(density={self.density}, flux={self.flux}, time_axis={self.time_axis}"
            f"{opts})"
        )

    def _terms(self, shape: Sequence[int], call: str) -> tuple[Term, ...]:
        d = len(shape) - 2
        space = [a for a in range(d) if a != self.time_axis % max(d, 1)]
        if len(space) != len(self.flux):
            raise GridError(
                f"{call}: the flux has {len(self.flux)} component(s), one per space axis, but "
                f"the output has {len(space)} space axis(es) besides time (shape {tuple(shape)})."
            )
        terms = [Term(1.0, self.density, self.time_axis % d, 1)]
        terms += [Term(1.0, c, a, 1) for c, a in zip(self.flux, space)]
        return tuple(terms)
