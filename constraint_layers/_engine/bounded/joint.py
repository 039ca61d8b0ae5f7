"""The bounded step of the projection engine (private): equality rows AND box bounds.

The constrained output minimises ``(v - u)^T W^{-1} (v - u)`` subject to the equality rows of
the other constraints (boundary, conservation) and ``lower <= v <= upper`` (:class:`Bounds`).
The equality-only result comes first (through :func:`constraint_layers._engine.dispatch.project`);
when it already lies in the bounds it is returned unchanged, so inactive bounds cost one
comparison and change nothing. Otherwise the solver follows from the structure:

==============================  ===============================================================
what acts                       bounded solver (:mod:`constraint_layers._engine.bounded`)
==============================  ===============================================================
bounds alone, no metric or a    the clip (exact: the problem separates by entry)
diagonal one
one integral constraint, no     :func:`project_bounded_rows` on the per-frame rows: one
boundary rows, a diagonal (or   multiplier per row from its piecewise-linear equation
no) metric
boundary rows, deterministic    the boundary step ``B(v) = S v + f`` keeps its meaning (its
output                          face-local rows eliminated): the bounded Euclidean projection
                                of ``u`` onto ``G S v = b - G f`` with the bounds on the values
                                ``B`` leaves unchanged AND on the values it sets (Neumann pivots,
                                a lift: affine in ``v``, sparse rows), then ``B``;
                                :func:`~constraint_layers._engine.bounded.faces.project_faces_bounded`
                                (a projected Newton method on the dual, exact); a Dirichlet wall
                                value outside the bounds raises (no other value changes it)
anything else (a dense or       :func:`project_bounded`: the dual active-set method on the
low-rank covariance, several    stacked rows (boundary rows where each condition is in charge,
constraints, boundary rows on   then the conservation rows)
a Gaussian)
==============================  ===============================================================

Gaussian outputs (``metric="covariance"``): the mean is the bounded projection in the covariance
metric, the mode of the conditioned Gaussian restricted to the box. The uncertainty, by the
bounds' ``variance``: ``"rows"`` (default) keeps the equality-only posterior (conditioned on the
rows) around the bounded mean; ``"active"`` conditions the Gaussian on the rows AND on the active
bounds held as equalities (``u_i = bound_i`` for ``i`` in the active set ``A``): the variance is 0
on ``A``, the free entries are conditioned on the rows over the free set, and the record carries
that posterior (its samples satisfy every row and sit on the active bounds; they are not
truncated at the free entries). With ``metric="euclidean"`` (HardC) only the mean moves; the
uncertainty is the equality-only one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..._grid import resolve_spacing
from ...bounds import Bounds, resolve_bounds
from ...conservation.gaussian import Gaussian
from ...errors import ConstraintError, IncompatibleConstraintsError
from ..dependence import data_rounding, independent_rows
from ..faces import apply_plan, boundary_rows, condition_rhs, plan
from ..gaussian import condition_gaussian
from ..rowops import pull_back as _pull_back
from ..rowops import row_labels as _labels
from ..rowops import split_families
from ..rowops import stack_dense as _stack
from ..streaming import flat_event, grid_view
from ..tags import structure_of
from . import project_bounded, project_bounded_rows
from .faces import project_faces_bounded

__all__ = ["project_with_bounds"]

F64 = torch.float64


#: The private solvers' names (``project_bounded (sample (0,)): ...``), which a message under
#: the user's call leaves out.
_SOLVER_HEAD = re.compile(r"^project_bounded(?:_rows)?(?: \(([^:]*)\))?: ")


def _within(x: Tensor, lo: Tensor | None, hi: Tensor | None) -> bool:
    ok = True
    if lo is not None:
        ok = ok and bool((x.detach() >= lo.detach()).all())
    if hi is not None:
        ok = ok and bool((x.detach() <= hi.detach()).all())
    return ok


def _clip(x: Tensor, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    return torch.clamp(x, lo, hi) if (lo is not None or hi is not None) else x


def _active(x: Tensor, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    act = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if lo is not None:
        act = act | (x.detach() <= lo.detach())
    if hi is not None:
        act = act | (x.detach() >= hi.detach())
    return act


def _flat(t: Tensor | None, batch: int) -> Tensor | None:
    return None if t is None else t.reshape(batch, -1)


def _is_zero(noise: Any) -> bool:
    if isinstance(noise, Tensor):
        return bool((noise == 0).all())
    if isinstance(noise, (list, tuple)):
        return all(float(v) == 0 for v in noise)
    return float(noise) == 0.0


def _reraise(err: ConstraintError, call: str, constraints: Sequence[Any], bounds) -> None:
    order = ", ".join(repr(c) for c in constraints) or "no equality rows"
    detail = _SOLVER_HEAD.sub(lambda m: f"{m[1]}: " if m[1] else "", str(err))
    raise IncompatibleConstraintsError(
        f"{call}: the bounds {list(bounds)} cannot hold together with the rows of [{order}] "
        f"(rows stacked in that order; integral rows are indexed (batch, channel, *frames)): "
        f"{detail}"
    ) from err


def project_with_bounds(
    pred: Gaussian,
    constraints: Sequence[Any],
    bounds: Sequence[Bounds],
    *,
    equality: Callable[[Gaussian], Gaussian],
    grid: Any,
    lift: int,
    noise: Any,
    metric: str,
    grid_shape: Sequence[int] | None,
    inputs: Any,
    call: str,
) -> Gaussian:
    """Enforce the equality ``constraints`` and the ``bounds`` on one prediction.

    ``equality`` is the engine's equality-only projection (applied first; its result comes back
    unchanged when it lies in the bounds). Returns a :class:`Gaussian` in the input's layout and
    dtype. See the module docstring for the solvers and the Gaussian semantics.
    """
    k = pred.event_ndim
    mean = pred.mean
    shape = grid_view(mean, k, grid_shape, call)
    lo, hi = resolve_bounds(
        bounds,
        shape,
        dtype=mean.dtype,
        device=mean.device,
        inputs=inputs,
        flat_shape=tuple(mean.shape),
        call=call,
    )
    eq = equality(pred) if constraints else pred
    if _within(eq.mean.reshape(shape), lo, hi):
        return eq
    if constraints and not _is_zero(noise):
        raise ValueError(
            f"{call}: bounds need exact equality rows (noise=0), got noise={noise!r}: with noisy "
            "rows the bounded mode is not defined by this layer. Drop the noise, or the bounds."
        )
    bnd, con = split_families(constraints)
    deterministic = pred.variance is None and pred.covariance is None and pred.low_rank is None
    try:
        if deterministic:
            u = mean.reshape(shape)
            z = _deterministic(u, bnd, con, lo, hi, shape, grid, lift, inputs, call)
            return Gaussian(z.reshape(mean.shape), event_ndim=k)
        return _gaussian(pred, eq, bnd, con, lo, hi, shape, grid, metric, bounds, inputs, call)
    except ConstraintError as err:
        if getattr(err, "wall_outside", False):
            raise
        _reraise(err, call, constraints, bounds)
        raise  # unreachable: _reraise raises


# ------------------------------------------------------------------------------ deterministic
def _deterministic(u, bnd, con, lo, hi, shape, grid, lift, inputs, call) -> Tensor:
    """The bounded Euclidean projection of a deterministic grid output ``u`` (shape)."""
    if bnd:
        return _after_boundary(u, bnd, con, lo, hi, shape, grid, lift, inputs, call)
    if not con:
        return _clip(u, lo, hi)
    if len(con) == 1 and structure_of(con[0]) == "frame":
        return _separable(u, None, con[0], lo, hi, shape, inputs, call)[0]
    B = shape[0]
    G, b = _equality_rows([], con, shape, grid, inputs, call)
    x = project_bounded(u.reshape(B, -1), G, b, lower=_flat(lo, B), upper=_flat(hi, B))
    return x.reshape(shape)


def _separable(
    u, var, con, lo, hi, shape, inputs, call, conditioned: bool = False
) -> tuple[Tensor, Tensor | None]:
    """One integral constraint on a diagonal (or no) metric ``var``: the per-frame fast path.

    Returns the bounded values (grid ``shape``) and, with ``conditioned``, the variance
    conditioned on the rows and on the active bounds (0 there)."""
    lay = con.layout(shape, call)
    w = con.weights(lay.sizes, device=u.device).flatten()  # (K,)
    total = con._totals(lay, inputs, call).to(u.device)  # (B, C', *rest)
    rows = lay.to_rows(u)  # (B, C', *rest, K)
    wr = None if var is None else lay.to_rows(var)
    lor = None if lo is None else lay.to_rows(lo)
    hir = None if hi is None else lay.to_rows(hi)
    x = project_bounded_rows(rows, w, total, weight=wr, lower=lor, upper=hir)
    out = lay.from_rows(x, _clip(u, lo, hi))  # channels without rows: the clip
    if var is None or not conditioned:
        return out, None
    free = torch.where(_active(x, lor, hir), 0.0, wr.to(F64))
    wv = free * w
    s = (wv * w).sum(-1, keepdim=True)
    cond = free - torch.where(s > 0, wv.square() / torch.where(s > 0, s, 1.0), 0.0)
    cond = cond.clamp_min(0).to(var.dtype)
    var_out = torch.where(_active(u, lo, hi), 0.0, var) if lay.channels is not None else var
    return out, lay.from_rows(cond, var_out)


def _moved(bplan: Any, n: int, device: Any) -> Tensor:
    """(n,) bool: the flat positions the boundary step sets (moves and pivots)."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    for c in bplan.conds:
        mask[c.moves.reshape(-1).to(device)] = True
        mask[c.index.gather(1, c.pivot.unsqueeze(1)).reshape(-1).to(device)] = True
    return mask


def _after_boundary(u, bnd, con, lo, hi, shape, grid, lift, inputs, call) -> Tensor:
    """Boundary rows on a deterministic output: the face-local rows eliminated (``B(v) = S v +
    f``), the bounded projection of ``u`` onto the substituted rows ``G S v = b - G f`` with the
    bounds on the values ``B`` leaves unchanged and on the values it sets (affine in ``v``):
    :func:`~constraint_layers._engine.bounded.faces.project_faces_bounded`, then ``B``."""
    B, n = shape[0], math.prod(shape[1:])
    hs = resolve_spacing(
        shape[2:], spacing=grid.spacing, extent=grid.extent, endpoint=grid.endpoint, call=call
    )
    bplan = plan(shape, bnd, hs, lift, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, B, u.dtype, u.device, inputs, call) for c, bc in zip(bplan.conds, bnd)
    ]
    moved = _moved(bplan, n, u.device)
    inf = torch.tensor(math.inf, dtype=u.dtype, device=u.device)
    lo_v = None if lo is None else torch.where(moved, -inf, lo.reshape(B, n))
    hi_v = None if hi is None else torch.where(moved, inf, hi.reshape(B, n))
    flat = u.reshape(B, n)
    f0 = apply_plan(torch.zeros_like(u), bplan, rhs).reshape(B, n).to(F64)  # B(0)
    if con:
        rows = [c.rows(shape, inputs=inputs) for c in con]
        G, b = _stack(rows, B, n)
        G, b = G.to(u.device), b.to(u.device)
        Gp = _pull_back(G, bplan, shape)  # (M, N) or (B, M, N)
        bp = b - (f0 @ G.mT if G.ndim == 2 else (G @ f0.unsqueeze(-1)).squeeze(-1))
        if Gp.ndim == 2:
            labels = _labels(con, [r.num_rows for r in rows])
            eps_rows, eps_rhs = data_rounding(con, u.dtype)
            Gp, bp = independent_rows(Gp, bp, labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs)
        Gp_b = Gp if Gp.ndim == 3 else Gp.expand(B, *Gp.shape)
    else:
        Gp_b = torch.zeros((B, 0, n), dtype=F64, device=u.device)
        bp = torch.zeros((B, 0), dtype=F64, device=u.device)
    # the values the step sets, as functions of v: x_m = W_m v + f_m (zero rows: Dirichlet)
    idx, W, T, settable = _wall_rows(bplan, moved, shape)
    fs = f0[:, idx]
    wl = torch.full_like(fs, -math.inf) if lo is None else lo.reshape(B, n)[:, idx].to(F64) - fs
    wh = torch.full_like(fs, math.inf) if hi is None else hi.reshape(B, n)[:, idx].to(F64) - fs
    outside = ~settable & ((wl.detach() > 0) | (wh.detach() < 0))
    if bool(outside.any()):
        s, m = (int(i) for i in outside.nonzero()[0])
        raise _wall_outside(bnd, shape, s, int(idx[m]), float(f0[s, idx[m]]), lo, hi, call)
    v, at_wl, at_wh = project_faces_bounded(
        flat, Gp_b, bp if bp.ndim == 2 else bp.expand(B, -1), W[settable], T,
        wl[:, settable], wh[:, settable], lo_v, hi_v, call,
    )  # fmt: skip
    z = apply_plan(v.to(u.dtype).reshape(shape), bplan, rhs).reshape(B, n)
    # wall values held at a bound: on it exactly (the pivot re-solve rounds)
    pos = idx[settable]
    for held, bound in ((at_wl, lo), (at_wh, hi)):
        if bound is not None and bool(held.any()):
            mask = torch.zeros((B, n), dtype=torch.bool, device=z.device)
            mask[:, pos] = held.to(z.device)
            z = torch.where(mask, bound.reshape(B, n).to(z.dtype), z)
    return _walls_exact(z, lo, hi, B, n).reshape(shape)


def _wall_rows(bplan: Any, moved: Tensor, shape: tuple[int, ...]):
    """The values the boundary step sets as functions of the values it leaves: ``(idx, W, T,
    settable)``: their flat positions (K,), the rows (K, t) over the columns ``T`` (t,) that any
    of them reads, and which rows are not zero (zero: a Dirichlet value). Cached on the plan."""
    cached = bplan.derived.get("wall_rows")
    if cached is None:
        n = moved.numel()
        idx = moved.nonzero().flatten()
        unit = torch.zeros((idx.numel(), n), dtype=F64, device=moved.device)
        unit[torch.arange(idx.numel(), device=moved.device), idx] = 1.0
        full = _pull_back(unit, bplan, shape) if idx.numel() else unit
        T = (full != 0).any(0).nonzero().flatten()
        cached = (idx, full[:, T].contiguous(), T, (full != 0).any(-1))
        bplan.derived["wall_rows"] = cached
    return cached


def _row(t: Tensor | None, s: int) -> Tensor | None:
    return None if t is None else t[s]


def _walls_exact(out: Tensor, lo: Tensor | None, hi: Tensor | None, B: int, n: int) -> Tensor:
    """Values held at a bound by the wall active set, put on it exactly (they miss it by the
    rounding of the step's pivot re-solve only)."""
    return _clip(out.reshape(B, n), _flat(lo, B), _flat(hi, B)).reshape(out.shape)


def _wall_outside(
    bnd, shape, s: int, m: int, z: float, lo, hi, call: str
) -> IncompatibleConstraintsError:
    """A value the boundary step sets whatever the input (a Dirichlet wall) outside the bounds."""
    B, n = shape[0], math.prod(shape[1:])
    pos = tuple(int(p) for p in torch.unravel_index(torch.tensor(m), tuple(shape[1:])))
    low = -math.inf if lo is None else float(lo.reshape(B, n)[s, m])
    high = math.inf if hi is None else float(hi.reshape(B, n)[s, m])
    err = IncompatibleConstraintsError(
        f"{call}: the boundary conditions {list(bnd)} set the value {z:.6g} at sample {s}, "
        f"index {pos} (channel, d1, ...), outside the bounds [{low:.6g}, {high:.6g}], and no "
        "choice of the other values changes it (a Dirichlet wall value): the wall values must "
        "lie in the bounds. Check the boundary values and the bounds."
    )
    err.wall_outside = True  # type: ignore[attr-defined]  # raised as it is
    return err


# ----------------------------------------------------------------------------------- Gaussian
def _equality_rows(bnd, con, shape, grid, inputs, call) -> tuple[Tensor, Tensor]:
    """The stacked rows (boundary rows where each condition is in charge, then conservation),
    dependent rows dropped (when shared by the batch): ``(M, N)`` or ``(B, M, N)``, ``(B, M)``."""
    B, n = shape[0], math.prod(shape[1:])
    brows = []
    if bnd:
        hs = resolve_spacing(
            shape[2:], spacing=grid.spacing, extent=grid.extent, endpoint=grid.endpoint, call=call
        )
        brows = boundary_rows(
            shape, bnd, spacing=hs, endpoint=grid.endpoint, inputs=inputs, include_overridden=False
        )
    crows = [c.rows(shape, inputs=inputs) for c in con]
    rows = [*brows, *crows]
    if not rows:
        return torch.zeros((0, n), dtype=F64), torch.zeros((B, 0), dtype=F64)
    G, b = _stack(rows, B, n)
    if G.ndim == 2:
        labels = _labels([*bnd, *con], [r.num_rows for r in rows])
        G, b = independent_rows(G, b, labels, call)
    return G, b


def _dense_cov(pred: Gaussian, B: int, n: int) -> Tensor | None:
    """The dense covariance (B, N, N) of a record with a covariance or a low-rank part."""
    if pred.covariance is not None:
        cov = pred.covariance
        cov = cov if isinstance(cov, Tensor) else cov.to_dense()
        return cov.reshape(-1, n, n).expand(B, n, n)
    if pred.low_rank is not None:
        L = pred.low_rank.reshape(-1, n, pred.low_rank.shape[-1])
        cov = L @ L.mT
        if pred.variance is not None:
            cov = cov + torch.diag_embed(pred.variance.reshape(-1, n))
        return cov.expand(B, n, n)
    return None


def _gaussian(pred, eq, bnd, con, lo, hi, shape, grid, metric, bounds, inputs, call) -> Gaussian:
    """The bounded mean in the metric; the uncertainty of the equality-only posterior
    (``variance="rows"``, or ``metric="euclidean"``) or conditioned on the active bounds."""
    k = pred.event_ndim
    mean = pred.mean
    B, n = shape[0], math.prod(shape[1:])
    lead = mean.shape[: mean.ndim - k]
    ev = mean.shape[mean.ndim - k :]
    euclid = metric == "euclidean"
    keep = euclid or all(getattr(b, "variance", "rows") == "rows" for b in bounds)
    diag = pred.covariance is None and pred.low_rank is None
    single = len(con) == 1 and structure_of(con[0]) == "frame"
    var_grid = None if pred.variance is None else pred.variance.reshape(shape)
    if diag and not bnd and (single or not con):
        weight = None if euclid else var_grid
        if con:
            x, var = _separable(
                mean.reshape(shape), weight, con[0], lo, hi, shape, inputs, call, not keep
            )
        else:
            x = _clip(mean.reshape(shape), lo, hi)
            var = None if keep else torch.where(_active(x, lo, hi), 0.0, weight)
        var = eq.variance if keep else var.reshape(mean.shape)
        return eq._replace(mean=x.reshape(mean.shape), variance=var)
    G, b = _equality_rows(bnd, con, shape, grid, inputs, call)
    G, b = G.to(mean.device), b.to(mean.device)
    u = mean.reshape(B, n)
    lo_f, hi_f = _flat(lo, B), _flat(hi, B)
    cov = None if euclid else _dense_cov(pred, B, n)
    weight = None if (euclid or cov is not None) else _flat(pred.variance, B)
    x = project_bounded(u, G, b, weight=weight, covariance=cov, lower=lo_f, upper=hi_f)
    x = x.to(mean.dtype)
    if keep:
        return eq._replace(mean=x.reshape(mean.shape))
    return _condition_active(pred, x, G, b, lo_f, hi_f, cov, shape, lead, ev, call)


def _condition_active(pred, x, G, b, lo, hi, cov, shape, lead, ev, call) -> Gaussian:
    """The Gaussian conditioned on the rows and the active bounds (held as equalities); its mean
    is ``x`` (the bounded projection)."""
    k = pred.event_ndim
    B, n = shape[0], math.prod(shape[1:])
    wdiag = cov.diagonal(dim1=-2, dim2=-1) if cov is not None else _flat(pred.variance, B)
    act = _active(x, lo, hi) & (wdiag.detach() > 0)  # fixed entries already hold
    posts, variances, downs = [], [], []
    for s in range(B):
        idx = act[s].nonzero().squeeze(-1)
        E = torch.zeros((idx.numel(), n), dtype=F64, device=x.device)
        E[torch.arange(idx.numel(), device=x.device), idx] = 1.0
        Gs = G if G.ndim == 2 else G[s]
        rows = torch.cat([Gs.to(F64), E])
        rhs = torch.cat([b[s].to(F64), x[s, idx].to(F64)]).unsqueeze(0)
        labels = [f"row {i}" for i in range(Gs.shape[0])] + [f"bound at {int(i)}" for i in idx]
        rows, rhs = independent_rows(rows, rhs, labels, call)
        if B == 1 and len(lead) <= 1:
            post = condition_gaussian(
                flat_event(pred.mean, k),
                rows,
                rhs.reshape(*lead, -1),
                variance=flat_event(pred.variance, k),
                covariance=pred.covariance,
                low_rank=pred.low_rank,
            )
        else:
            post = condition_gaussian(
                pred.mean.reshape(B, n)[s],
                rows,
                rhs[0],
                variance=None if pred.variance is None else pred.variance.reshape(B, n)[s],
                covariance=None if cov is None or pred.low_rank is not None else cov[s],
                low_rank=(
                    None
                    if pred.low_rank is None
                    else pred.low_rank.reshape(-1, n, pred.low_rank.shape[-1]).expand(B, -1, -1)[s]
                ),
            )
        posts.append(post)
        variances.append(post.variance.reshape(n))
        if pred.covariance is not None and post.factor is not None:
            downs.append(post.factor.reshape(n, -1))
    var = torch.stack(variances).to(x.dtype)
    var = torch.where(act, torch.zeros_like(var), var).reshape(*lead, *ev)
    down = None
    if downs:
        width = max(d.shape[-1] for d in downs)
        down = torch.stack([torch.nn.functional.pad(d, (0, width - d.shape[-1])) for d in downs])
        down = down.reshape(*lead, n, width).to(x.dtype)
    conditioned = posts[0] if B == 1 and len(lead) <= 1 else None
    mean = x.reshape(*lead, *ev)
    return Gaussian(mean, var, pred.covariance, None, down, k, conditioned)
