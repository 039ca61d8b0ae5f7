"""The local engine's deterministic entry points, and the layer's (private).

Semantics (any boundary conditions, any number of totals):

- ``cl.Dirichlet`` walls: the Dirichlet nodes are set to their values (to the bit, as
  everywhere), then the other nodes move by the Euclidean projection onto the local rows with
  the Dirichlet values substituted: ``u~ = z - M C^T (C M C^T)^+ (C z - f)``, ``z`` the output
  with the wall values, ``M`` the free nodes. This is the Euclidean projection onto all rows at
  once. Totals (conservation rows ``G u = b``, a few) too, by the Schur complement over the local
  solver (:func:`~constraint_layers.local.totals.with_totals`).
- Other walls (Neumann, periodic, ``lift``): the boundary step ``B(v) = S v + g`` keeps its
  meaning and the local rows act on the freedom it leaves:
  ``B(u - S^T C^T (C S S^T C^T)^+ (C B(u) - f))``
  (:func:`~constraint_layers.local.implicit.project_step`). Totals there: in the step's
  variable ``v``, the projection onto the local rows and the totals at once
  (:func:`~constraint_layers.local.totals.with_totals_step`).
- Several local constraints (Dirichlet walls or none, totals): the projection onto all their
  rows at once (:mod:`constraint_layers.local.stacked`).
- Bounds (with Dirichlet walls or none, and totals): :mod:`constraint_layers.local.bounded`.
- Gaussian outputs with a diagonal variance: :mod:`constraint_layers.local.gaussian`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._grid import resolve_spacing
from ..boundary.conditions import Dirichlet
from ..boundary.enforce import apply_plan, condition_rhs, plan
from ..rows import DEFAULT_GRID, GridSpec
from .constraint import LocalRows
from .implicit import project_cg, project_step
from .solve import fft_project
from .totals import with_totals, with_totals_step

__all__ = [
    "enforce_local",
    "is_local",
    "project_local",
    "project_record",
]

F64 = torch.float64


def is_local(constraints: Sequence[Any]) -> bool:
    """Whether any constraint states local rows (structure tag ``"local"``)."""
    return any(getattr(c, "structure", None) == "local" for c in constraints)


def _split(constraints: Sequence[Any], call: str) -> tuple[Any, list[Any], list[Any]]:
    """``(the local constraint, boundary conditions, totals (conservation rows) then bounds)``."""
    local, walls, rest = _split_many(constraints, call)
    if len(local) != 1:
        raise NotImplementedError(
            f"{call}: one local constraint (cl.DivergenceFree, cl.Continuity, cl.LinearPDE) per "
            f"call is supported here, got {len(local)}: {local}. Combine them into one "
            "cl.LinearPDE where they share the right-hand side, or open an issue."
        )
    return local[0], walls, rest


def _split_many(constraints: Sequence[Any], call: str) -> tuple[list, list[Any], list[Any]]:
    """``(the local constraints, boundary conditions, totals then bounds)``."""
    local = [c for c in constraints if getattr(c, "structure", None) == "local"]
    walls = [c for c in constraints if getattr(c, "family", None) == "boundary"]
    totals = [c for c in constraints if getattr(c, "family", None) == "conservation"]
    bounds = [c for c in constraints if getattr(c, "family", None) == "bounds"]
    other = [
        c for c in constraints if c not in local and c not in walls and c not in totals
        and c not in bounds
    ]  # fmt: skip
    if other:
        raise NotImplementedError(
            f"{call}: a local constraint combines with boundary conditions and conservation "
            f"totals and bounds only (got {other})."
        )
    return local, walls, totals + bounds


def _dirichlet_only(walls: Sequence[Any]) -> bool:
    return all(isinstance(c, Dirichlet) for c in walls)


def _step(y: Tensor, walls: Sequence[Any], grid: GridSpec, lift: int, inputs: Any, call: str):
    """The boundary step on float64 grids: ``(affine B, linear part S)``."""
    shape = tuple(y.shape)
    hs = resolve_spacing(shape[2:], spacing=grid.spacing, extent=grid.extent,
                         endpoint=grid.endpoint, call=call)  # fmt: skip
    bplan = plan(shape, walls, hs, lift, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, shape[0], F64, y.device, inputs, call)
        for c, bc in zip(bplan.conds, walls)
    ]
    zeros = [torch.zeros_like(r) for r in rhs]
    return (lambda x: apply_plan(x, bplan, rhs)), (lambda x: apply_plan(x, bplan, zeros))


def _walls(z: Tensor, walls: Sequence[Any], grid: GridSpec, inputs: Any, call: str):
    """``(z with the wall values, free-node mask (channels, *grid) or None)``."""
    if not walls:
        return z, None
    shape = tuple(z.shape)
    hs = resolve_spacing(shape[2:], spacing=grid.spacing, extent=grid.extent,
                         endpoint=grid.endpoint, call=call)  # fmt: skip
    bplan = plan(shape, walls, hs, 0, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, shape[0], z.dtype, z.device, inputs, call)
        for c, bc in zip(bplan.conds, walls)
    ]
    z = apply_plan(z, bplan, rhs)
    mask = torch.ones(math.prod(shape[1:]), dtype=torch.bool)
    for c in bplan.conds:
        mask[c.moves.flatten()] = False
    return z, mask.reshape(shape[1:]).to(z.device)


def _check_grid_output(mean: Tensor, call: str) -> None:
    if mean.ndim < 3:
        raise ValueError(
            f"{call}: local constraints act on channel-first grid outputs (batch, channels, d1, "
            f"..., dn); got shape {tuple(mean.shape)}."
        )
    if mean.is_complex():
        raise TypeError(
            f"{call}: local constraints act on real outputs, got {mean.dtype}; constrain the "
            "real and imaginary parts as channels (torch.view_as_real)."
        )


def enforce_local(
    y: Tensor,
    constraint: Any,
    *walls: Any,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    lift: int = 0,
) -> Tensor:
    """Project a grid output onto a local constraint (and walls, and totals), Euclidean.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn). Not modified.
    constraint : LinearPDE
        ``cl.DivergenceFree``, ``cl.Continuity`` or ``cl.LinearPDE``.
    *walls : boundary conditions or Conservation
        Boundary conditions held at the same time: ``cl.Dirichlet`` nodes are eliminated (e.g.
        no-slip walls: the Euclidean projection onto all rows); other conditions (Neumann,
        periodic, ``lift``) keep the meaning of their boundary step ``B(v) = S v + g`` and the
        local rows act on the freedom it leaves: ``B(u - S^T C^T (C S S^T C^T)^+ (C B(u) -
        f))``. Totals (``cl.Conservation``, ``cl.Conservation.integral``; with Dirichlet walls
        or none) by the Schur complement over the local solver (one local solve per total).
    spacing, extent, endpoint, inputs, lift
        The grid (as for :func:`~constraint_layers.functional.enforce_boundary`), the model
        input for callable values, and the boundary step's lift.

    Returns
    -------
    Tensor
        The closest output (Euclidean) with every row exact: same shape and dtype.
    """
    call = "enforce_local"
    return project_local(
        y, [constraint, *walls], grid=GridSpec(spacing, extent, endpoint), inputs=inputs,
        lift=lift, call=call,
    )  # fmt: skip


def project_local(
    y: Tensor,
    constraints: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    inputs: Any = None,
    lift: int = 0,
    call: str = "project_local",
) -> Tensor:
    """The deterministic projection (see the module docstring): ``y`` (batch, channels, *grid)."""
    _check_grid_output(y, call)
    locals_, walls, totals = _split_many(constraints, call)
    bounds = [c for c in totals if c.family == "bounds"]
    totals = [c for c in totals if c.family != "bounds"]
    if y.shape[0] == 0:
        return y
    if len(locals_) > 1:
        return _stacked(y, locals_, walls, totals, bounds, grid, inputs, lift, call)
    local = locals_[0]
    if bounds:
        return _bounded(y, local, walls, totals, bounds, grid, inputs, lift, call)
    if (walls and not _dirichlet_only(walls)) or lift:
        rows = local.rows(tuple(y.shape), grid=grid, inputs=inputs)
        affine, linear = _step(y.to(F64), walls, grid, lift, inputs, call)
        schur = None
        if totals:

            def schur(v1: Tensor, project0) -> Tensor:
                return with_totals_step(v1, project0, affine, linear, totals, grid, inputs,
                                        y.dtype, call)  # fmt: skip

        out = project_step(rows.operator, y.to(F64), linear, affine, rows.rhs.to(y.device), call,
                           totals=schur)  # fmt: skip
        return out.to(y.dtype)
    z, mask = _walls(y, walls, grid, inputs, call)
    rows: LocalRows = local.rows(tuple(y.shape), grid=grid, inputs=inputs)
    op = rows.operator
    z64 = z.to(F64)
    f = rows.rhs.to(z.device)

    def local_projection(x: Tensor, rhs: Tensor, check: bool = True) -> Tensor:
        if mask is None and op.fourier:  # f = 0: no transform of it, nothing to check
            return fft_project(op, x, None if not check else rhs, call)
        return project_cg(op, x, rhs, mask=mask, call=call, check=check, exact=True)

    # f = 0 with nothing eliminated: the right-hand side C z is in the range by construction
    homogeneous = mask is None and isinstance(local.value, float) and local.value == 0.0
    out = local_projection(z64, f, check=not homogeneous)
    if totals:
        out = with_totals(out, local_projection, mask, totals, grid, inputs, y.dtype, call)
    out = out.to(y.dtype)
    if mask is not None:  # wall values to the bit
        out = torch.where(mask, out, z)
    return out


def project_record(
    pred: Any,
    constraints: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    lift: int = 0,
    call: str = "project",
) -> Any:
    """The layer's entry: a prediction record (:class:`~constraint_layers.functional.Gaussian`)
    with local rows.

    - Deterministic: :func:`project_local`.
    - ``metric="euclidean"``: the Euclidean move of the mean, the uncertainty kept as given.
    - A diagonal variance with ``cl.Dirichlet`` walls (or none): :func:`condition_local`'s
      diagonal path; the record gets the conditioned mean and marginal variances.
    - A full covariance (a tensor or a linear operator), a low-rank one, or walls of any kind:
      :func:`~constraint_layers.local.covariance.condition_covariance`; the record gets the
      mean, the marginal variances and, for a full covariance, the ``downdate`` ``F``
      (posterior covariance ``covariance - F F^T``) and the structured posterior
      (``conditioned``: exact roots and the density on the rows, for the adapters). Dense
      algebra, so up to 64 x 64 nodes per channel; beyond that use
      ``functional.condition_local`` and its variance estimator.

    The record's event is ``(channels, d1, ..., dn)`` (leading axes: the batch); with
    ``grid_shape`` a flat event ``(n,)`` or ``(channels, n)``, ``n = prod(grid_shape)`` (C
    order), as a gpytorch GP gives it.
    """
    from ..conservation.gaussian import Gaussian
    from .gaussian import condition_local

    mean = pred.mean
    k = pred.event_ndim
    lead = tuple(mean.shape[: mean.ndim - k])
    event = tuple(mean.shape[mean.ndim - k :])
    B = math.prod(lead)
    if grid_shape is not None:
        gs = tuple(int(g) for g in grid_shape)
        n = math.prod(gs)
        if k not in (1, 2) or event[-1] != n:
            raise ValueError(
                f"{call}: with grid_shape={gs} local rows read a flat event (n,) or (channels, "
                f"n) with n = {n}; got an event of shape {event}."
            )
        gshape = (1 if k == 1 else event[0], *gs)
    else:
        if k < 2:
            raise ValueError(
                f"{call}: local constraints act on channel-first grid outputs (batch, channels, "
                f"d1, ..., dn); got an event of shape {event}. For a flat event give the grid it "
                "lies on: grid_shape=(d1, ..., dn)."
            )
        gshape = event
    if not (isinstance(noise, (int, float)) and noise == 0):
        raise NotImplementedError(f"{call}: local rows are exact; noise must be 0, got {noise}.")

    def to_grid(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.broadcast_to(x, mean.shape).reshape(B, *gshape)

    full = pred.covariance is not None or pred.low_rank is not None
    if (pred.variance is None and not full) or metric == "euclidean":
        out = project_local(to_grid(mean), constraints, grid=grid, inputs=inputs, lift=lift,
                            call=call)  # fmt: skip
        return pred._replace(mean=out.reshape(mean.shape), downdate=None, conditioned=None)
    local, walls, totals = _split(constraints, call)
    if lift:
        raise NotImplementedError(
            f"{call}: Gaussian outputs are conditioned on local rows with lift=0 only "
            "(metric='euclidean' moves the mean with a lift)."
        )
    if not full and _dirichlet_only(walls):
        g = condition_local(
            to_grid(mean), to_grid(pred.variance), local, *walls, *totals, spacing=grid.spacing,
            extent=grid.extent, endpoint=grid.endpoint, inputs=inputs, call=call,
        )  # fmt: skip
        return Gaussian(g.mean.reshape(mean.shape), g.variance.reshape(mean.shape),
                        event_ndim=k)  # fmt: skip
    from .covariance import condition_covariance

    N = math.prod(gshape)
    cov, low = pred.covariance, pred.low_rank
    for name, x in (("covariance", cov), ("low_rank", low)):
        if x is not None and len(x.shape) > 3:
            if not isinstance(x, Tensor):
                raise NotImplementedError(
                    f"{call}: a {name} linear operator with several batch axes "
                    f"{tuple(x.shape[:-2])} is not supported with local rows; flatten the "
                    "batch into one axis."
                )
            x = x.reshape(-1, *x.shape[-2:])
        if name == "covariance":
            cov = x
        else:
            low = x
    g = condition_covariance(
        to_grid(mean), local, walls, totals, covariance=cov, low_rank=low,
        variance=to_grid(pred.variance), grid=grid, inputs=inputs, lead=lead, call=call,
    )  # fmt: skip
    var = g.variance.reshape(mean.shape)
    out = g.mean.reshape(mean.shape)
    if pred.covariance is None:
        if pred.low_rank is None:  # a diagonal variance with other walls: the fast path's record
            return Gaussian(out, var, event_ndim=k)
        return Gaussian(out, var, None, None, None, k, g)
    F = g.factor.to(mean.dtype)
    F = F.reshape(*lead, N, F.shape[-1])
    return Gaussian(out, var, pred.covariance, None, F, k, g)


def _bounded(y, local, walls, totals, bounds, grid, inputs, lift, call) -> Tensor:
    """Bounds with local rows (and Dirichlet walls): :mod:`constraint_layers.local.bounded`."""
    from ..bounds import resolve_bounds
    from .bounded import check_walls_in_bounds, project_local_bounded

    if lift or not _dirichlet_only(walls):
        raise NotImplementedError(
            f"{call}: bounds with local rows combine with cl.Dirichlet walls and totals only "
            f"(lift=0) for now; got walls {list(walls)} and lift={lift}. Use cl.Dirichlet walls "
            "with lift=0, or leave the bounds out (the walls and the rows then hold exactly)."
        )
    z, mask = _walls(y, walls, grid, inputs, call)
    lo, hi = resolve_bounds(bounds, tuple(y.shape), dtype=F64, device=y.device, inputs=inputs,
                            flat_shape=None, call=call)  # fmt: skip
    check_walls_in_bounds(z, mask, lo, hi, bounds, call)
    rows: LocalRows = local.rows(tuple(y.shape), grid=grid, inputs=inputs)
    out = project_local_bounded(
        rows.operator, z.to(F64), rows.rhs.to(y.device), mask, lo, hi, call,
        totals=(totals, grid, inputs) if totals else None,
    )  # fmt: skip
    out = out.to(y.dtype)
    if mask is not None:
        out = torch.where(mask, out, z)
    if lo is not None:  # the cast to the output dtype may round across a bound
        out = torch.maximum(out, lo.to(y.dtype))
    if hi is not None:
        out = torch.minimum(out, hi.to(y.dtype))
    return out


def _stacked(y, locals_, walls, totals, bounds, grid, inputs, lift, call) -> Tensor:
    """Several local constraints (with Dirichlet walls or none, and totals):
    :mod:`constraint_layers.local.stacked`."""
    from .stacked import disjoint, fft_project_stacked, project_stacked

    if bounds or lift or not _dirichlet_only(walls):
        raise NotImplementedError(
            f"{call}: several local constraints in one call combine with cl.Dirichlet walls and "
            f"totals (lift=0, no bounds) for now; got walls {list(walls)}, lift={lift}, bounds "
            f"{list(bounds)}. State them as one cl.LinearPDE where they can be, or drop the "
            "bounds / use cl.Dirichlet walls."
        )
    z, mask = _walls(y, walls, grid, inputs, call)
    rows = [c.rows(tuple(y.shape), grid=grid, inputs=inputs) for c in locals_]
    ops = [r.operator for r in rows]
    z64 = z.to(F64)
    f = torch.stack([r.rhs.to(z.device) for r in rows], 1)  # (batch, L, *grid)
    separate = disjoint(ops)
    fourier = mask is None and all(op.fourier for op in ops)

    def local_projection(x: Tensor, rhs: Tensor, check: bool = True) -> Tensor:
        if rhs.ndim == x.ndim - 1:  # one right-hand side for all (zero: totals' fields)
            rhs = rhs.unsqueeze(1).expand(-1, len(ops), *rhs.shape[1:])
        if separate:  # orthogonal rows: one projection after the other
            for i, op in enumerate(ops):
                if mask is None and op.fourier:
                    x = fft_project(op, x, rhs[:, i] if check else None, call)
                else:
                    x = project_cg(op, x, rhs[:, i], mask=mask, call=call, check=check,
                                   exact=True)  # fmt: skip
            return x
        if fourier:
            return fft_project_stacked(ops, x, rhs, call)
        return project_stacked(ops, x, rhs, mask, call)

    out = local_projection(z64, f)
    if totals:
        out = with_totals(out, local_projection, mask, totals, grid, inputs, y.dtype, call)
    out = out.to(y.dtype)
    if mask is not None:
        out = torch.where(mask, out, z)
    return out
