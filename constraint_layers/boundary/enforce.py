"""Pure tensor functions behind the boundary layer (private; public names in ``functional``)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from .._grid import check_grid, flat_channels, normalize_dim, resolve_spacing
from .stencils import lift_profile, ramp
from ..errors import ConstraintError, GridError

if TYPE_CHECKING:
    from .conditions import BoundaryCondition

__all__ = ["BoundaryRows", "boundary_residuals", "boundary_rows", "enforce_boundary"]


class _Face:
    """The nodes of one side of one axis, counted inward from the face.

    ``out`` must be a tensor the caller owns (a clone) when writing: writes go into it.
    """

    def __init__(self, out: Tensor, axis: int, side: str, channels: Tensor | None) -> None:
        self.v = out.movedim(axis, -1)  # a view: (batch, channels, *tangential, n)
        self.n = self.v.shape[-1]
        self.low = side == "low"
        self.ch = channels

    def _index(self, last: int | slice) -> tuple:
        if self.ch is None:
            return (..., last)
        return (slice(None), self.ch, ..., last)

    def _pos(self, j: int) -> int:
        return j if self.low else self.n - 1 - j

    def read(self, j: int) -> Tensor:
        """Node ``j`` counted inward: shape ``(batch, channels, *tangential)``."""
        return self.v[self._index(self._pos(j))]

    def write(self, j: int, value: Tensor | float) -> None:
        self.v[self._index(self._pos(j))] = value

    def add_block(self, block: Tensor) -> None:
        """Add ``block[..., j]`` to node ``j`` for ``j = 0 .. k`` (inward order)."""
        k = block.shape[-1]
        if self.low:
            idx = self._index(slice(0, k))
            self.v[idx] = self.v[idx] + block
        else:
            idx = self._index(slice(self.n - k, self.n))
            self.v[idx] = self.v[idx] + block.flip(-1)


def spread(delta: Tensor, lift: int, w: Tensor | None) -> Tensor:
    """A face correction ``delta`` spread over the face node and ``lift`` nodes inward.

    The face node gets all of ``delta``; node ``j`` gets ``phi_j * w * delta`` with the smooth
    profile ``phi`` and the tangential weight ``w`` (which keeps the spread off nodes read by
    earlier conditions on other axes).
    """
    phi = torch.tensor(lift_profile(lift), dtype=delta.dtype, device=delta.device)
    out = delta.unsqueeze(-1) * phi
    if w is not None:
        out = torch.cat([out[..., :1], out[..., 1:] * w.unsqueeze(-1)], dim=-1)
    return out


def _conditions(bcs: object, call: str) -> tuple[BoundaryCondition, ...]:
    from .conditions import BoundaryCondition  # local: boundary imports this module

    if isinstance(bcs, BoundaryCondition):
        bcs = (bcs,)
    if not isinstance(bcs, Iterable):
        raise TypeError(
            f"{call}: expected a boundary condition or a sequence of them, got "
            f"{type(bcs).__name__}."
        )
    bcs = tuple(bcs)
    for bc in bcs:
        if not isinstance(bc, BoundaryCondition):
            raise TypeError(
                f"{call}: expected boundary conditions (cl.Dirichlet, cl.Neumann, cl.Periodic), "
                f"got {type(bc).__name__}."
            )
    return bcs


def _check_lift(lift: object, call: str) -> int:
    if isinstance(lift, bool) or not isinstance(lift, int) or lift < 0:
        raise ValueError(f"{call}: lift must be a non-negative int (nodes), got {lift!r}.")
    return lift


class _Plan(NamedTuple):
    axis: int  # tensor axis (2 + spatial dim)
    dim: int  # spatial dim, normalised
    size: int
    h: float
    ch: Tensor | None
    face_shape: tuple[int, ...]


def _plan(
    y: Tensor,
    bcs: Sequence[BoundaryCondition],
    hs: Sequence[float],
    lift: int,
    endpoint: bool,
    call: str,
    exclusive: bool = False,
) -> list[_Plan]:
    n_spatial = y.ndim - 2
    dims = [normalize_dim(bc.dim, n_spatial, f"{call}: {bc!r}") for bc in bcs]
    reach_on_axis: dict[int, int] = {}
    claimed: dict[tuple[int, str], list[BoundaryCondition]] = {}
    for bc, d in zip(bcs, dims):
        reach_on_axis[d] = max(reach_on_axis.get(d, 0), bc.reach)
        for side in bc.sides if exclusive else ():
            for other in claimed.get((d, side), []):
                if (
                    bc.channels is None
                    or other.channels is None
                    or (set(bc.channels) & set(other.channels))
                ):
                    raise ConstraintError(
                        f"{call}: {other!r} and {bc!r} both act on the {side} face of spatial "
                        f"axis {d} for the same channel(s); a face takes one condition per "
                        "channel. Remove one, or split them with channels=."
                    )
            claimed.setdefault((d, side), []).append(bc)
    plans = []
    for bc, d in zip(bcs, dims):
        size = y.shape[2 + d]
        need = reach_on_axis[d] + 1 + lift
        if size < need:
            raise GridError(
                f"{call}: {bc!r} needs at least {need} nodes along spatial axis {d} (stencil reach "
                f"{reach_on_axis[d]} per side, lift={lift}), got {size} (output shape "
                f"{tuple(y.shape)})."
            )
        if not endpoint and (bc.kind == "periodic" or "high" in bc.sides):
            raise GridError(
                f"{call}: {bc!r} acts on the high end, but endpoint=False says the grid leaves out "
                "the node at the high end (a periodic grid such as linspace(0, 1, N + 1)[:-1]). "
                "There is no boundary node to correct there: use a grid that holds both ends, or "
                "a model that is periodic by construction."
            )
        ch = flat_channels(bc.channels, y.shape[1], f"{call}: {bc!r}")
        if ch is not None:
            ch = ch.to(y.device)
        n_ch = y.shape[1] if ch is None else len(ch)
        tangential = tuple(s for i, s in enumerate(y.shape[2:]) if i != d)
        plans.append(_Plan(2 + d, d, size, hs[d], ch, (y.shape[0], n_ch, *tangential)))
    return plans


def _tangential_weight(
    y: Tensor,
    plan: _Plan,
    earlier: list[tuple[BoundaryCondition, _Plan]],
    later: list[tuple[BoundaryCondition, _Plan]],
    lift: int,
) -> Tensor | None:
    """Weights over the face for the lifted spread (None: all ones).

    They vanish on nodes read by earlier conditions on other axes (so the spread cannot break
    them) and on the face nodes of later conditions on other axes (corners and edges the later
    condition takes over: spreading a correction from there would make the result depend on the
    state those nodes had before, and correcting twice would move it).
    """
    if not lift:
        return None
    masked: dict[int, list[int]] = {}
    for group, width in ((earlier, None), (later, 1)):
        for bc, p in group:
            if p.dim == plan.dim:
                continue
            lo_hi = masked.setdefault(p.dim, [0, 0])
            reach = bc.reach if width is None else width
            if "low" in bc.sides:
                lo_hi[0] = max(lo_hi[0], reach)
            if "high" in bc.sides:
                lo_hi[1] = max(lo_hi[1], reach)
    if not masked:
        return None
    w = torch.ones((), dtype=y.dtype, device=y.device)
    for i, size in enumerate(y.shape[2:]):
        if i == plan.dim:
            continue
        lo, hi = masked.get(i, (0, 0))
        r = torch.tensor(ramp(size, lo, hi, lift), dtype=y.dtype, device=y.device)
        w = w.unsqueeze(-1) * r
    return w


def enforce_boundary(
    y: Tensor,
    bcs: BoundaryCondition | Sequence[BoundaryCondition],
    *,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    lift: int = 0,
    inputs: Any = None,
) -> Tensor:
    """Correct a channel-first grid so that the boundary conditions hold exactly.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn). Not modified.
    bcs : BoundaryCondition or sequence of them
        Applied in order; where two meet (corners, edges) the later one holds.
    spacing : float or sequence of float, optional
        Grid spacing per spatial axis (fixed). Exclusive with ``extent``.
    extent : float or sequence of float, optional
        Domain length per axis (default 1): spacing ``extent / (N - 1)``, recomputed from ``y``.
    endpoint : bool, default True
        Whether the grid holds the node at the high end of each axis.
    lift : int, default 0
        Spread each correction smoothly over ``lift`` nodes next to the face (no kink next to the
        boundary); the conditions still hold exactly.
    inputs : any, optional
        The model input, passed to callable values.

    Returns
    -------
    Tensor
        shape: (batch, channels, d1, ..., dn), same dtype and device as ``y``.

    Raises
    ------
    GridError
        ``y`` is not a channel-first grid, ``dim`` is out of range, the grid is too short for a
        stencil, or a value does not broadcast to its face.
    ValueError
        A value holds NaN or inf.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> y = torch.randn(4, 1, 64)
    >>> bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]
    >>> z = cl.functional.enforce_boundary(y, bcs)
    >>> float(cl.metrics.boundary_error(z, bcs).max()) < 1e-3
    True
    """
    call = "enforce_boundary"
    check_grid(y, call)
    bcs = _conditions(bcs, call)
    lift = _check_lift(lift, call)
    hs = resolve_spacing(y.shape[2:], spacing=spacing, extent=extent, endpoint=endpoint, call=call)
    plans = _plan(y, bcs, hs, lift, endpoint, call, exclusive=True)
    out = y.clone()
    pairs = list(zip(bcs, plans))
    for i, (bc, p) in enumerate(pairs):
        g = bc.resolve_value(out.dtype, out.device, p.face_shape, inputs, call)
        w = _tangential_weight(out, p, pairs[:i], pairs[i + 1 :], lift)
        bc._apply(out, p.axis, p.ch, g, p.h, lift, w)
    return out


def boundary_residuals(
    y: Tensor,
    bcs: BoundaryCondition | Sequence[BoundaryCondition],
    *,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    include_overridden: bool = True,
) -> list[list[Tensor]]:
    """Residual of each condition on ``y``: per condition, one face tensor per side.

    Dirichlet: ``u - value``; Neumann: ``du/dn - value`` (the one-sided stencil); Periodic:
    ``u(low) - u(high)``. Each face tensor has shape ``(batch, channels, *face dims)``.
    With ``include_overridden=False`` the residual is zero on face points that a later condition
    on another axis takes over (corners and edges, where the later condition holds).
    """
    call = "boundary_residuals"
    check_grid(y, call)
    bcs = _conditions(bcs, call)
    hs = resolve_spacing(y.shape[2:], spacing=spacing, extent=extent, endpoint=endpoint, call=call)
    plans = _plan(y, bcs, hs, 0, endpoint, call)
    out = []
    for i, (bc, p) in enumerate(zip(bcs, plans)):
        g = bc.resolve_value(y.dtype, y.device, p.face_shape, inputs, call)
        parts = bc._residuals(y, p.axis, p.ch, g, p.h)
        if not include_overridden:
            parts = [_drop_overridden(r, bc, p, bcs[i + 1 :], plans[i + 1 :]) for r in parts]
        out.append(parts)
    return out


def _drop_overridden(
    r: Tensor,
    bc: BoundaryCondition,
    p: _Plan,
    later: Sequence[BoundaryCondition],
    later_plans: Sequence[_Plan],
) -> Tensor:
    """Zero the residual on face points that a later condition on another axis takes over."""
    for other, q in zip(later, later_plans):
        if q.dim == p.dim:
            continue
        if bc.channels is not None and other.channels is not None:
            if not set(bc.channels) & set(other.channels):
                continue
        pos = 2 + (q.dim if q.dim < p.dim else q.dim - 1)
        if "low" in other.sides:
            r = r.index_fill(pos, torch.tensor([0], device=r.device), 0.0)
        if "high" in other.sides:
            r = r.index_fill(pos, torch.tensor([r.shape[pos] - 1], device=r.device), 0.0)
    return r


class BoundaryRows(NamedTuple):
    """Rows of ``C u = d`` of one condition over the flattened per-sample output.

    ``u`` is one sample flattened in C order over ``(channels, d1, ..., dn)``.
    """

    index: Tensor  # shape: (M, K), long: the flat positions each row reads
    coeff: Tensor  # shape: (M, K), float64: their coefficients
    rhs: Tensor  # shape: (batch, M), float64: the right-hand sides d
    moves: Tensor  # shape: (M, Km), long: the positions the output step may move for each row

    def dense(self, size: int) -> Tensor:
        """The dense ``(M, size)`` float64 matrix ``C``."""
        c = torch.zeros(self.index.shape[0], size, dtype=torch.float64)
        return c.scatter_add_(1, self.index, self.coeff)


def boundary_rows(
    shape: Sequence[int],
    bcs: BoundaryCondition | Sequence[BoundaryCondition],
    *,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
) -> list[BoundaryRows]:
    """The linear rows ``C u = d`` each condition states for an output of ``shape``.

    This is the structured form every constraint of the library shares (see the architecture's
    "one idea under both layers"); tests check the fast correction against the projection
    ``u - W C^T (C W C^T)^{-1} (C u - d)`` built from these rows.
    """
    call = "boundary_rows"
    shape = tuple(int(s) for s in shape)
    size = math.prod(shape[1:])
    ids = torch.arange(size, dtype=torch.float64).reshape(1, *shape[1:])
    probe = torch.zeros((), dtype=torch.float64).expand(shape)  # no allocation
    bcs = _conditions(bcs, call)
    hs = resolve_spacing(shape[2:], spacing=spacing, extent=extent, endpoint=endpoint, call=call)
    plans = _plan(probe, bcs, hs, 0, endpoint, call)
    out = []
    for bc, p in zip(bcs, plans):
        g = bc.resolve_value(torch.float64, torch.device("cpu"), p.face_shape, inputs, call)
        faces = {s: _Face(ids, p.axis, s, p.ch) for s in ("low", "high")}
        idx, coef, rhs, mov = [], [], [], []
        for side in bc._row_sides():
            terms = bc._terms(side, p.h)
            idx.append(torch.stack([faces[s].read(j).flatten() for s, j, _ in terms], -1))
            m = idx[-1].shape[0]
            coef.append(torch.tensor([c for *_, c in terms], dtype=torch.float64).expand(m, -1))
            mov.append(torch.stack([faces[s].read(j).flatten() for s, j in bc._moves(side)], -1))
            rhs.append(torch.broadcast_to(torch.as_tensor(g, dtype=torch.float64), p.face_shape))
        out.append(
            BoundaryRows(
                torch.cat(idx).long(),
                torch.cat(coef),
                torch.cat([r.reshape(shape[0], -1) for r in rhs], dim=1),
                torch.cat(mov).long(),
            )
        )
    return out
