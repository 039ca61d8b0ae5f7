"""The face-local output step: boundary rows and their exact enforcement (private; public names in
``functional``).

Each condition states, per face point, a row ``c . u = d``, a direction ``v`` (``c . v = 1``) and
a pivot ``p``. The step applies the conditions in order; for each it moves the nodes along ``v``
by the residual, then re-solves the pivot from its row::

    u <- u + v (d - c . u)                       (all rows of the condition at once)
    u_p <- (d - sum_{j != p} c_j u_j) / c_p      (exact: a Dirichlet value holds to the bit)

which is the projection ``u - V (C V)^{-1} (C u - d)`` (``V = W C^T`` with ``W`` the nodes that may
move; a smooth profile next to the face with ``lift``). The rows' structure (positions,
coefficients, directions) depends only on the conditions and the grid, so it is built once per
output shape and cached; each call computes the right-hand sides and runs gathers and
scatters over the flattened output.

The cache is shared by every wrapper and call in the process, whatever their autograd context:
its tensors are built outside ``torch.inference_mode`` and without gradients
(``_state.building_constants``), so a plan made during a validation under inference mode serves
the training step that follows (PyTorch Lightning's loop), and results its users derive from the
structure are stored as plain constants too (``derived``, a ``ConstantDict``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._grid import check_grid, flat_channels, resolve_spacing
from .._state import ConstantDict, building_constants
from .._values import check_finite_now
from ..boundary.conditions import BoundaryCondition
from ..boundary.stencils import ramp
from ..errors import ConstraintError, GridError
from ..rows import Rows

__all__ = [
    "BoundaryPlan",
    "apply_plan",
    "boundary_residuals",
    "boundary_rows",
    "condition_rhs",
    "enforce_boundary",
    "plan",
]

F64 = torch.float64


def conditions(bcs: object, call: str) -> tuple[BoundaryCondition, ...]:
    """``bcs`` as a tuple of boundary conditions (a clear TypeError otherwise)."""
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


def check_lift(lift: object, call: str) -> int:
    if isinstance(lift, bool) or not isinstance(lift, int):
        raise TypeError(f"{call}: lift must be a non-negative int (nodes), got {lift!r}.")
    if lift < 0:
        raise ValueError(f"{call}: lift must be a non-negative int (nodes), got {lift!r}.")
    return lift


class _Cond(NamedTuple):
    """One condition's rows on one output shape (structure only: no values)."""

    axis: int  # spatial axis
    h: float
    face_shape: tuple[int, ...]  # (channels', *tangential): one row per entry, per row side
    index: Tensor  # (M, K) long
    coeff: Tensor  # (M, K) float64
    moves: Tensor  # (M, J) long
    weights: Tensor  # (M, J) float64
    pivot: Tensor  # (M,) long: column of index
    solve_only: bool  # the pivot is the only node moved: the exact re-solve is the whole step
    overridden: Tensor  # (M,) bool: face points a later condition on another axis takes over

    def rows(self, rhs: Tensor) -> Rows:
        return Rows(self.index, self.coeff, rhs, self.moves, self.weights, self.pivot)


class BoundaryPlan(NamedTuple):
    """The structure of every condition of a set on one output shape, with fast-path tensors."""

    conds: tuple[_Cond, ...]
    fast: tuple[dict[str, Tensor], ...]  # per condition, per (dtype, device) on first use
    #: Results that depend on the structure only, computed once by their users (the engine's
    #: fixed-point rows of the step); stored as plain constants (no inference tensors, no graph).
    derived: ConstantDict

    def device_tensors(self, i: int, dtype: torch.dtype, device: torch.device) -> dict:
        key = (dtype, device)
        cache = self.fast[i]
        t = cache.get(key)
        if t is None:
            with building_constants():  # shared by later calls in any autograd context
                t = self._device_tensors(i, dtype, device)
            cache[key] = t
        return t

    def _device_tensors(self, i: int, dtype: torch.dtype, device: torch.device) -> dict:
        c = self.conds[i]
        cp = c.coeff.gather(1, c.pivot.unsqueeze(1))  # (M, 1)
        rest = c.coeff.scatter(1, c.pivot.unsqueeze(1), 0.0) / cp
        return {
            "index": c.index.to(device),
            "coeff": c.coeff.to(device=device, dtype=dtype),
            "rest": rest.to(device=device, dtype=dtype),
            "inv_pivot": (1.0 / cp.squeeze(1)).to(device=device, dtype=dtype),
            "unit_pivot": bool((cp == 1).all()),
            "pos": c.index.gather(1, c.pivot.unsqueeze(1)).squeeze(1).to(device),
            "moves": c.moves.reshape(-1).to(device),
            "weights": c.weights.to(device=device, dtype=dtype),
        }


_CACHE: dict[tuple, BoundaryPlan] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 64


def plan(
    shape: Sequence[int],
    bcs: Sequence[BoundaryCondition],
    hs: Sequence[float],
    lift: int,
    endpoint: bool,
    call: str,
    exclusive: bool = True,
) -> BoundaryPlan:
    """The rows' structure of ``bcs`` on an output of ``shape`` (cached per structure).

    Refused under ``torch.jit.trace``: the structure depends on the shape, which a trace would
    freeze (the traced function would be wrong at any other resolution)."""
    if torch.jit.is_tracing():
        raise NotImplementedError(
            f"{call}: boundary conditions cannot be traced with torch.jit.trace: their rows "
            "depend on the grid (boundary positions, spacing), which a trace freezes as "
            "constants (wrong results at any other resolution). Use torch.compile instead, or "
            "call it untraced."
        )
    shape = tuple(int(s) for s in shape)
    key = (
        tuple(bc.structure_key() for bc in bcs),
        shape[1:],
        tuple(hs),
        lift,
        endpoint,
        exclusive,
    )
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    with building_constants():  # shared by later calls in any autograd context
        conds = _build(shape, bcs, hs, lift, endpoint, call, exclusive)
    out = BoundaryPlan(conds, tuple({} for _ in conds), ConstantDict())
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = out
    return out


def _check_claims(bcs: Sequence[BoundaryCondition], axes: Sequence[int], call: str) -> None:
    claimed: dict[tuple[int, str], list[BoundaryCondition]] = {}
    for bc, d in zip(bcs, axes):
        for side in bc.sides:
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


def _face(ids: Tensor, axis: int, side: str, ch: Tensor | None, j: int) -> Tensor:
    """Flat ids of node ``j`` (inward) of a face: shape (channels', *tangential)."""
    v = ids.movedim(1 + axis, -1)  # ids: (C, *grid) -> (C, *tangential, n)
    if ch is not None:
        v = v[ch]
    n = v.shape[-1]
    return v[..., j if side == "low" else n - 1 - j]


def _tangential_weight(
    grid: tuple[int, ...],
    axis: int,
    earlier: Sequence[tuple[BoundaryCondition, int]],
    later: Sequence[tuple[BoundaryCondition, int]],
    lift: int,
) -> Tensor | None:
    """Weights over the face (shape: tangential) for the lifted spread; None: all ones.

    They vanish on nodes read by earlier conditions on other axes (so the spread cannot break
    them) and on the face nodes of later conditions on other axes (corners and edges the later
    condition takes over: spreading a correction from there would make the result depend on the
    state those nodes had before, and correcting twice would move it).
    """
    masked: dict[int, list[int]] = {}
    for group, width in ((earlier, None), (later, 1)):
        for bc, d in group:
            if d == axis:
                continue
            lo_hi = masked.setdefault(d, [0, 0])
            reach = bc.reach if width is None else width
            if "low" in bc.sides:
                lo_hi[0] = max(lo_hi[0], reach)
            if "high" in bc.sides:
                lo_hi[1] = max(lo_hi[1], reach)
    if not masked:
        return None
    w = torch.ones((), dtype=F64)
    for i, size in enumerate(grid):
        if i == axis:
            continue
        lo, hi = masked.get(i, (0, 0))
        w = w.unsqueeze(-1) * torch.tensor(ramp(size, lo, hi, lift), dtype=F64)
    return w


def _build(shape, bcs, hs, lift, endpoint, call, exclusive) -> tuple[_Cond, ...]:
    n_spatial = len(shape) - 2
    grid = shape[2:]
    axes = [bc.axis(n_spatial, call) for bc in bcs]
    if exclusive:
        _check_claims(bcs, axes, call)
    reach_on_axis: dict[int, int] = {}
    for bc, d in zip(bcs, axes):
        reach_on_axis[d] = max(reach_on_axis.get(d, 0), bc.reach)
    ids = torch.arange(math.prod(shape[1:])).reshape(shape[1:])
    pairs = list(zip(bcs, axes))
    out = []
    for i, (bc, d) in enumerate(pairs):
        size = grid[d]
        need = reach_on_axis[d] + 1 + lift
        if size < need:
            raise GridError(
                f"{call}: {bc!r} needs at least {need} nodes along spatial axis {d} (stencil reach "
                f"{reach_on_axis[d]} per side, lift={lift}), got {size} (output shape "
                f"{tuple(shape)})."
            )
        if not endpoint and "high" in {s for s, _, _ in bc.stencil("low", 1.0)} | set(bc.sides):
            raise GridError(
                f"{call}: {bc!r} acts on the high end, but endpoint=False says the grid leaves out "
                "the node at the high end (a periodic grid such as linspace(0, 1, N + 1)[:-1]). "
                "There is no boundary node to correct there: use a grid that holds both ends, or "
                "a model that is periodic by construction."
            )
        ch = flat_channels(bc.channels, shape[1], f"{call}: {bc!r}")
        h = hs[d]
        w = _tangential_weight(grid, d, pairs[:i], pairs[i + 1 :], lift) if lift else None
        index, coeff, moves, weights, pivot = [], [], [], [], []
        for side in bc.row_sides:
            terms = bc.stencil(side, h)
            idx = torch.stack([_face(ids, d, s, ch, j).flatten() for s, j, _ in terms], -1)
            m = idx.shape[0]
            index.append(idx)
            coeff.append(torch.tensor([c for *_, c in terms], dtype=F64).expand(m, -1))
            piv = bc.pivot(side)
            pivot.append(torch.full((m,), [(s, j) for s, j, _ in terms].index(piv)))
            q = bc.mobility(side, h, 0)
            p = bc.mobility(side, h, lift) if lift else q
            nodes = sorted({(s, j) for s, j, _ in p} | {(s, j) for s, j, _ in q})
            mv = torch.stack([_face(ids, d, s, ch, j).flatten() for s, j in nodes], -1)
            pw = torch.tensor(
                [dict(((s, j), c) for s, j, c in p).get(n, 0.0) for n in nodes], dtype=F64
            )
            qw = torch.tensor(
                [dict(((s, j), c) for s, j, c in q).get(n, 0.0) for n in nodes], dtype=F64
            )
            if w is None:
                wt = pw.to(F64).expand(m, -1)
            else:  # the blend w P + (1 - w) Q per face point (c . v = 1 for both)
                wf = w.expand(*_face(ids, d, side, ch, 0).shape[1:]).reshape(1, -1)
                wf = wf.expand(idx.shape[0] // wf.shape[1], -1).reshape(-1, 1)
                wt = wf * pw.to(F64) + (1 - wf) * qw.to(F64)
            moves.append(mv)
            weights.append(wt)
        face_shape = tuple(_face(ids, d, bc.row_sides[0], ch, 0).shape)
        mv = torch.cat(moves)
        piv = torch.cat(pivot)
        idx = torch.cat(index)
        solve_only = mv.shape[1] == 1 and bool(
            (mv[:, 0] == idx.gather(1, piv[:, None])[:, 0]).all()
        )
        over = _overridden(face_shape, len(bc.row_sides), bc, d, pairs[i + 1 :])
        out.append(
            _Cond(
                d,
                h,
                face_shape,
                idx,
                torch.cat(coeff),
                mv,
                torch.cat(weights),
                piv,
                solve_only,
                over,
            )
        )
    return tuple(out)


def _overridden(
    face_shape: tuple[int, ...],
    n_sides: int,
    bc: BoundaryCondition,
    axis: int,
    later: Sequence[tuple[BoundaryCondition, int]],
) -> Tensor:
    """(M,) bool: the face points that a later condition on another axis takes over."""
    mask = torch.zeros(face_shape, dtype=torch.bool)
    for other, q in later:
        if q == axis:
            continue
        if bc.channels is not None and other.channels is not None:
            if not set(bc.channels) & set(other.channels):
                continue
        pos = 1 + (q if q < axis else q - 1)  # in (channels', *tangential)
        if "low" in other.sides:
            mask.index_fill_(pos, torch.tensor([0]), True)
        if "high" in other.sides:
            mask.index_fill_(pos, torch.tensor([face_shape[pos] - 1]), True)
    return mask.flatten().repeat(n_sides)


def condition_rhs(
    c: _Cond,
    bc: BoundaryCondition,
    batch: int,
    dtype: torch.dtype,
    device: Any,
    inputs: Any,
    call: str,
) -> Tensor:
    """The right-hand sides of condition ``bc`` (structure ``c``): shape (batch, M) in ``dtype``.

    The value must be finite in ``dtype`` (a value beyond its range raises, naming it).
    """
    face = (batch, *c.face_shape)
    g = bc.resolve_value(dtype, device, face, inputs, call)
    if isinstance(g, float):
        if math.isfinite(g) and abs(g) > torch.finfo(dtype).max:
            raise ValueError(
                f"{call}: {bc!r}: the value {g:g} overflows the output dtype {dtype} (largest "
                f"{torch.finfo(dtype).max:g}); use a wider dtype."
            )
    g = torch.as_tensor(g, dtype=dtype, device=device)
    g = torch.broadcast_to(g, face).flatten(1)
    return g.repeat(1, len(bc.row_sides)) if len(bc.row_sides) > 1 else g


def _grid_options(y_shape, spacing, extent, endpoint, call):
    return resolve_spacing(
        y_shape[2:], spacing=spacing, extent=extent, endpoint=endpoint, call=call
    )


def apply_plan(y: Tensor, bplan: BoundaryPlan, rhs: Sequence[Tensor]) -> Tensor:
    """Run the face-local step of every condition of ``bplan`` on ``y`` (not modified).

    ``rhs[i]``: shape (batch, M_i), the right-hand sides of condition ``i`` in ``y``'s dtype.
    """
    # one copy of the output (flatten, not reshape(batch, -1): an empty batch has no -1); the steps
    # write into it in place (the gathers save no input, so autograd allows it)
    u = y.flatten(1).clone()
    for i, c in enumerate(bplan.conds):
        t = bplan.device_tensors(i, u.dtype, u.device)
        d = rhs[i]
        if not c.solve_only:  # the rank-one step along each row's direction
            r = d - (u[:, t["index"]] * t["coeff"]).sum(-1)  # (B, M)
            u.index_add_(1, t["moves"], (t["weights"] * r.unsqueeze(-1)).flatten(1))
        # the exact re-solve of the pivot: u_p = (d - sum_{j != p} c_j u_j) / c_p
        if c.index.shape[1] == 1 and t["unit_pivot"]:
            new = d  # a Dirichlet row: the value itself, bit for bit
        else:
            rest = (u[:, t["index"]] * t["rest"]).sum(-1)
            new = d - rest if t["unit_pivot"] else d * t["inv_pivot"] - rest
        u.index_copy_(1, t["pos"], new.to(u.dtype))
    return u.reshape(y.shape)


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
        ``y`` is not a channel-first grid, ``dim`` is out of range or missing on a multi-axis
        grid, the grid is too short for a stencil, or a value does not broadcast to its face.
    ValueError
        ``y`` or a value holds NaN or inf.

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
    bcs = conditions(bcs, call)
    lift = check_lift(lift, call)
    check_finite_now(y, call, "input y")
    hs = _grid_options(y.shape, spacing, extent, endpoint, call)
    bplan = plan(y.shape, bcs, hs, lift, endpoint, call)
    rhs = [
        condition_rhs(c, bc, y.shape[0], y.dtype, y.device, inputs, call)
        for c, bc in zip(bplan.conds, bcs)
    ]
    return apply_plan(y, bplan, rhs)


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
    bcs = conditions(bcs, call)
    hs = _grid_options(y.shape, spacing, extent, endpoint, call)
    bplan = plan(y.shape, bcs, hs, 0, endpoint, call, exclusive=False)
    u = y.flatten(1)
    out = []
    for c, bc in zip(bplan.conds, bcs):
        d = condition_rhs(c, bc, y.shape[0], y.dtype, y.device, inputs, call)
        r = (u[:, c.index.to(y.device)] * c.coeff.to(device=y.device, dtype=y.dtype)).sum(-1) - d
        if not include_overridden:
            r = r.masked_fill(c.overridden.to(y.device), 0.0)
        parts = r.reshape(y.shape[0], len(bc.row_sides), *c.face_shape).unbind(1)
        out.append(list(parts))
    return out


def boundary_rows(
    shape: Sequence[int],
    bcs: BoundaryCondition | Sequence[BoundaryCondition],
    *,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    lift: int = 0,
    inputs: Any = None,
    include_overridden: bool = True,
) -> list[Rows]:
    """The linear rows ``C u = d`` each condition states for an output of ``shape``.

    With their mobility: the face-local step equals, condition by condition, the projection
    ``u - V (C V)^{-1} (C u - d)`` with ``V`` the rows' directions (tests check it against the
    dense formula). ``include_overridden=False`` leaves out the rows at face points that a later
    condition on another axis takes over (what a joint projection conditions on).

    Examples
    --------
    >>> import constraint_layers as cl
    >>> rows = cl.functional.boundary_rows((2, 1, 9), [cl.Neumann(1.0, side="high", order=1)])
    >>> rows[0].index.tolist(), rows[0].coeff.tolist()
    ([[8, 7]], [[8.0, -8.0]])
    """
    call = "boundary_rows"
    shape = tuple(int(s) for s in shape)
    bcs = conditions(bcs, call)
    lift = check_lift(lift, call)
    hs = _grid_options(shape, spacing, extent, endpoint, call)
    bplan = plan(shape, bcs, hs, lift, endpoint, call, exclusive=False)
    out = []
    for c, bc in zip(bplan.conds, bcs):
        rows = c.rows(condition_rhs(c, bc, shape[0], F64, torch.device("cpu"), inputs, call))
        out.append(rows if include_overridden else rows.select(~c.overridden))
    return out
