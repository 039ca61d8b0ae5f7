"""Projection onto linear equality rows AND box bounds (private; pure tensor functions, torch only).

The problem, for a prediction ``u`` and a metric ``W`` (symmetric positive semidefinite)::

    minimise   (x - u)^T W^{-1} (x - u)
    subject to C x = d   and   lower <= x <= upper        (bounds may be -inf / +inf per entry)

``W`` is the mobility of each value: the Euclidean projection (``W = I``, a deterministic model,
HardC), the boundary mobility, or the model's covariance (a Gaussian output, ProbConserv). An
entry with zero weight (a zero row and column of ``W``) is fixed: it cannot move. Without active
bounds the solution is the equality-only projection ``u - W C^T (C W C^T)^{-1} (C u - d)``
(:func:`constraint_layers.functional.conserve` with ``noise = 0``).

Two solvers:

* :func:`project_bounded_rows`, the separable fast path. ``W = diag(w)`` and rows that touch
  disjoint entries (one quadrature row per time frame), laid out as ``(*batch, M, n)``: row ``m``
  is ``sum_i c[..., m, i] x[..., m, i] = d[..., m]``. The KKT conditions give
  ``x_i = clip(u_i - w_i c_i lam_m, lower_i, upper_i)`` with one multiplier per row, and
  ``f(lam) = sum_i c_i x_i(lam)`` is continuous, piecewise linear and non-increasing, with
  breakpoints where an entry meets a bound. ``lam`` is found exactly: a safeguarded Newton
  iteration on the segments of ``f`` (each step solves the linear equation of the current
  segment; it stops when the step lands on a point where ``f = d`` to rounding, i.e. on its own
  segment), kept inside a bracket of the root; if that does not finish (a zero slope, a step
  outside the bracket, 60 steps), the row falls back to the sorted-breakpoint search (sort, find
  the segment that holds ``d`` by bisection over the breakpoints, solve its linear equation).
  Every row of every sample is solved at once (vectorised); rows are processed in cache-sized
  groups so that the iteration runs on data in cache. Autograd: a hand-written backward, the
  implicit function theorem on the active set.
* :func:`project_bounded`, the general path: any ``W`` (a dense covariance, a diagonal, or the
  identity) and overlapping rows ``C`` (``M x N``, ``M`` small). The dual active-set method of
  Goldfarb and Idnani (finite, exact; it starts from the equality-only projection and adds the
  most violated bound, dropping bounds whose multiplier would change sign) finds the active set;
  the result is then the equality-only projection onto the rows plus the active bounds (written
  with torch operations, so autograd differentiates the active-set solution). Looped over
  samples; cost per sample O(N^2 (M + k)) for ``k`` active bounds.

Gaussian outputs (the semantics the layer implements with :func:`active_bounds`): the bounded
mean is the MODE of the conditioned Gaussian ``u | C u = d`` restricted to the box (on the affine
set ``C u = d`` the conditioned density is ``exp(-(x - u)^T W^{-1} (x - u) / 2)`` up to a constant,
so its maximiser over the box is the bounded projection in the covariance metric). The variance
is set to 0 where a bound is active and the free entries are conditioned on the equality rows
over the free set: that is the equality-only conditioning with the active entries' variance set
to zero (e.g. ``conserve(x, G, d, variance=torch.where(active, 0, var))``, whose mean is ``x``
itself because ``x`` already satisfies the rows).

Exactness: rows hold to rounding (the algebra runs in float64, results come back in the input
dtype); bounds hold exactly (no value outside, the bounds rounded to the output dtype). Infeasible
data (no point of the box satisfies a row) raise :class:`~constraint_layers.errors.ConstraintError`
naming the rows, the requested total and the reachable range.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConstraintError, SingularConstraintError

__all__ = ["active_bounds", "project_bounded", "project_bounded_rows"]

F64 = torch.float64
EPS = torch.finfo(F64).eps
#: Float64 values per block of the separable solver (its temporaries stay in cache).
CHUNK = 1 << 15
#: Newton steps per group of rows before the rows left fall back to the breakpoint search.
MAX_NEWTON = 60
#: A row has converged when |f(lam) - d| <= RTOL * (sum_i |c_i x_i| + |d|).
RTOL = 64 * EPS

Bound = float | Tensor | None


# ------------------------------------------------------------------------------- validation
def _tensor(x: object, name: str, call: str, *, allow_none: bool = False) -> Tensor | None:
    """A floating tensor (numbers become float64 scalars); None where allowed."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, Tensor)):
        raise TypeError(
            f"{call}: {name} must be a number or a floating-point torch.Tensor, "
            f"got {type(x).__name__}."
        )
    if not isinstance(x, Tensor):
        return torch.tensor(float(x), dtype=F64)
    if not x.is_floating_point():
        raise TypeError(
            f"{call}: {name} must be a floating-point tensor, got dtype {x.dtype}. Convert it "
            "with .double() or .float()."
        )
    return x


def _broadcast(shapes: dict[str, tuple[int, ...]], call: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes.values()))
    except RuntimeError:
        given = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(
            f"{call}: the arguments must broadcast to one shape (*batch, M, n) (rows in the "
            f"second-to-last axis, their entries in the last); got {given}."
        ) from None


def _finite_check(tensors: dict[str, Tensor | None], call: str, *, bounds: bool = False) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        td = t.detach()
        bad = torch.isnan(td) if bounds else ~torch.isfinite(td)
        if bool(bad.any()):
            what = "NaN" if bounds or bool(torch.isnan(td).any()) else "inf"
            raise ValueError(
                f"{call}: {name} holds {what} (first at index "
                f"{tuple(bad.nonzero()[0].tolist())}); pass finite values"
                + (" (a bound may be -inf / +inf, never NaN)." if bounds else ".")
            )


def _check_order(lo: Tensor | None, hi: Tensor | None, call: str) -> None:
    if lo is None or hi is None:
        return
    bad = lo.detach() > hi.detach()
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        lo_v = float(lo.detach().expand(bad.shape)[idx])
        hi_v = float(hi.detach().expand(bad.shape)[idx])
        raise ValueError(
            f"{call}: lower must not exceed upper, but lower = {lo_v!r} > upper = {hi_v!r} at "
            f"index {idx} (of the broadcast shape {tuple(bad.shape)})."
        )


def _check_weight(w: Tensor | None, call: str) -> None:
    if w is None or w.numel() == 0:
        return
    low = float(w.detach().amin())
    if not low >= 0:
        what = "NaN" if math.isnan(low) else f"a negative value ({low:.3e})"
        raise ValueError(
            f"{call}: weight must be non-negative and finite (variances or mobilities; 0 fixes "
            f"an entry), but it holds {what}."
        )


def _check_fixed(u: Tensor, fixed: Tensor, lo: Tensor | None, hi: Tensor | None, call: str) -> None:
    """An entry that cannot move (zero weight) must already lie in its bounds."""
    out = torch.zeros_like(fixed)
    if lo is not None:
        out |= u.detach() < lo.detach()
    if hi is not None:
        out |= u.detach() > hi.detach()
    out &= fixed
    if bool(out.any()):
        idx = tuple(out.nonzero()[0].tolist())
        raise ConstraintError(
            f"{call}: entry {idx} has zero weight (it cannot move) but its value "
            f"{float(u.detach().expand(out.shape)[idx])!r} lies outside its bounds "
            f"[{_at(lo, out.shape, idx)}, {_at(hi, out.shape, idx)}]: no solution exists. "
            "Give it a positive weight, or fix the data."
        )


def _at(t: Tensor | None, shape: tuple[int, ...], idx: tuple[int, ...]) -> str:
    if t is None:
        return "-inf/+inf"
    return repr(float(t.detach().expand(shape)[idx]))


def _infeasible(
    call: str,
    batch: tuple[int, ...],
    rows: Tensor,  # (K,) flat row indices
    total: Tensor,  # (K,)
    low: Tensor,  # (K,)
    high: Tensor,  # (K,)
) -> ConstraintError:
    items = []
    for k in range(min(int(rows.numel()), 5)):
        idx = tuple(int(i) for i in torch.unravel_index(rows[k], batch)) if batch else ()
        items.append(
            f"row {idx}: requested total {float(total[k]):.6g}, reachable range "
            f"[{float(low[k]):.6g}, {float(high[k]):.6g}]"
        )
    more = f" (and {int(rows.numel()) - 5} more)" if rows.numel() > 5 else ""
    return ConstraintError(
        f"{call}: no value within the bounds satisfies {int(rows.numel())} constraint row(s) "
        f"(index in (*batch, M)): " + "; ".join(items) + more + ". The bounds and the fixed "
        "(zero-weight) entries make these totals impossible: check the totals, the bounds and "
        "the wall values."
    )


# ------------------------------------------------------------------- separable fast path
def _as_rows(t: Tensor | None, shape: tuple[int, ...]) -> Tensor | None:
    """``t`` broadcast to ``shape = (*batch, M, n)`` as a 2-D view ``(R or 1, n or 1)`` (no copy
    unless the broadcast pattern cannot be flattened)."""
    if t is None:
        return None
    n = shape[-1]
    rows = math.prod(shape[:-1])
    t = t.expand(shape)
    lead = t.stride()[:-1]
    if all(s == 0 for s in lead):
        t2 = t[(0,) * (t.ndim - 1)].unsqueeze(0)
        return t2[:, :1] if t.stride(-1) == 0 else t2
    if t.stride(-1) == 0:
        return t[..., :1].reshape(rows, 1)
    return t.reshape(rows, n)


def _blk(t: Tensor | None, rs: slice, cs: slice) -> Tensor | None:
    """The block ``(rs, cs)`` of a 2-D view, respecting its broadcast (size-1) axes, float64."""
    if t is None:
        return None
    return t[rs if t.shape[0] > 1 else slice(None), cs if t.shape[1] > 1 else slice(None)].to(F64)


class _Problem:
    """The flattened separable problem: rows of entries, as 2-D float64-on-read views."""

    def __init__(self, u, c, w, lo, hi, d, shape, out_dtype, call):
        self.shape = shape
        self.rows = math.prod(shape[:-1])
        self.n = shape[-1]
        self.u, self.c, self.w = _as_rows(u, shape), _as_rows(c, shape), _as_rows(w, shape)
        self.lo, self.hi = _as_rows(lo, shape), _as_rows(hi, shape)
        self.d = d.to(F64).expand(shape[:-1]).reshape(self.rows)
        self.out_dtype = out_dtype
        self.call = call

    def load(self, rs: slice, cs: slice) -> tuple:
        """Float64 block: u, c, a = w c, a c, lo, hi (a block of at most ``CHUNK`` values)."""
        u, c = _blk(self.u, rs, cs), _blk(self.c, rs, cs)
        w = _blk(self.w, rs, cs)
        a = c if w is None else w * c
        return u, c, a, a * c, _blk(self.lo, rs, cs), _blk(self.hi, rs, cs), w

    def check_block(self, blk: tuple) -> None:
        """Cheap checks on first touch (NaN and inf show up in the row sums instead)."""
        u, _, _, _, lo, hi, w = blk
        if w is not None:
            wmin = float(w.amin())
            if not wmin > 0:
                _check_weight(w, self.call)
                if wmin == 0:
                    shape = torch.broadcast_shapes(u.shape, w.shape)
                    _check_fixed(u, (w == 0).expand(shape), lo, hi, self.call)
        if lo is not None and hi is not None and (lo.numel() > 1 or hi.numel() > 1):
            _check_order(lo, hi, self.call)

    def explain_nonfinite(self, blk: tuple) -> None:
        u, c, _, _, lo, hi, w = blk
        _finite_check({"u": u, "coef": c, "weight": w}, self.call)
        _finite_check({"lower": lo, "upper": hi}, self.call, bounds=True)
        raise ValueError(
            f"{self.call}: the row sums are not finite: an entry bounded to +inf or -inf on "
            "both sides, or values so large that their products overflow float64."
        )


def _evaluate(blk: tuple, lam: Tensor, out: Tensor | None = None, scale: bool = False):
    """Row sums of one block at ``lam`` (rows, 1) float64: (sum c x, slope, sum |c x| or None).

    The slope counts the entries with ``x == v`` (free, or exactly at a bound: a tie, the slope
    of one side). The indicator is formed as ``1 - |sign(v - x)|`` in float arithmetic (several
    times faster on CPU than a boolean mask and ``where``).
    """
    u, c, a, ac, lo, hi, _ = blk
    v = torch.addcmul(u, a, lam, value=-1.0)  # u - a lam
    if lo is None and hi is None:
        x, slope = v, ac.expand(v.shape).sum(-1)
    else:
        x = torch.clamp(v, lo, hi)
        free = torch.sub(v, x).sign_().abs_().neg_().add_(1.0)
        slope = free.mul_(ac).sum(-1)
    if out is not None:
        out.copy_(x)
    cx = c * x
    return cx.sum(-1), slope, (cx.abs_().sum(-1) if scale else None)


def _solve_group(prob: _Problem, rs: slice, out: Tensor, force_sort: bool) -> Tensor:
    """Solve the rows ``rs`` (their multipliers, float64 (rows,)); writes ``out[rs]``."""
    n = prob.n
    nrow = rs.stop - rs.start
    col = [slice(s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)] if n > CHUNK else [slice(None)]
    cached = [prob.load(rs, cs) for cs in col] if len(col) == 1 else None
    d = prob.d[rs]
    dev = d.device

    def blocks():
        for i, cs in enumerate(col):
            yield cs, (cached[i] if cached is not None else prob.load(rs, cs))

    def f(lam: Tensor, write: bool = False, first: bool = False, want_scale: bool = False):
        """(f(lam) - d, slope, rounding scale) per row; ``write``: x into ``out[rs]``."""
        r = torch.zeros(nrow, dtype=F64, device=dev)
        s, scale = torch.zeros_like(r), torch.zeros_like(r)
        lam_ = lam.unsqueeze(-1)
        for cs, blk in blocks():
            if first:
                prob.check_block(blk)
            ri, si, sc = _evaluate(
                blk, lam_, out[rs, cs] if write else None, scale=first or want_scale
            )
            if first and not bool(torch.isfinite(ri).all()):
                prob.explain_nonfinite(blk)
            r += ri
            s += si
            if sc is not None:
                scale += sc
        return r - d, s, scale + d.abs()

    lam = torch.zeros(nrow, dtype=F64, device=dev)
    todo = torch.ones(nrow, dtype=torch.bool, device=dev)
    if force_sort:
        f(lam, first=True)
    else:
        lo_b = torch.full_like(lam, -math.inf)
        hi_b = torch.full_like(lam, math.inf)
        r_lo, r_hi = torch.full_like(lam, math.inf), torch.full_like(lam, -math.inf)
        for it in range(MAX_NEWTON):
            r, s, sc = f(lam, write=True, first=it == 0)
            if it == 0:  # the rounding scale of the row sums: sum |c x| + |d| at the start
                tol = RTOL * sc
            todo = ~(r.abs() <= tol)
            if not bool(todo.any()):
                return lam
            pos, neg = todo & (r > 0), todo & (r < 0)  # f decreasing: the root lies right / left
            lo_b, r_lo = torch.where(pos, lam, lo_b), torch.where(pos, r, r_lo)
            hi_b, r_hi = torch.where(neg, lam, hi_b), torch.where(neg, r, r_hi)
            newton = lam + r / s
            ok = (s > 0) & (newton > lo_b) & (newton < hi_b)
            secant = lo_b + r_lo * ((hi_b - lo_b) / (r_lo - r_hi))
            ok_sec = torch.isfinite(secant) & (secant > lo_b) & (secant < hi_b)
            stuck = todo & ~ok & ~ok_sec
            if bool(stuck.any()):
                width = hi_b - lo_b  # inf while a side is open
                tiny = torch.isfinite(width) & (
                    width <= 4 * EPS * torch.maximum(lo_b.abs(), hi_b.abs())
                )
                if bool((stuck & ~tiny).any()):
                    break  # a zero slope or a step out of the bracket: the breakpoint search
                todo = todo & ~stuck  # a bracket one ulp wide: lam is the root to rounding
                if not bool(todo.any()):
                    return lam
            lam = torch.where(todo, torch.where(ok, newton, secant), lam)
    # ---- the exact breakpoint search for the rows left (rare; every row if force_sort)
    lam = _breakpoint_search(prob, rs, f, lam, todo)
    f(lam, write=True)
    return lam


def _breakpoint_search(prob: _Problem, rs: slice, f, lam: Tensor, todo: Tensor) -> Tensor:
    """Sort the breakpoints of each row, find the segment of f that holds d by bisection over
    them, solve its linear equation. Rows where ``todo`` is False keep ``lam``."""
    nrow, n = lam.shape[0], prob.n
    u, _, a, _, lo, hi, _ = prob.load(rs, slice(None))
    full = (nrow, n)
    inf = math.inf
    nz = (a != 0).expand(full)
    t1 = ((u - lo) / a).expand(full) if lo is not None else torch.full(full, inf, dtype=F64)
    t2 = ((u - hi) / a).expand(full) if hi is not None else torch.full(full, inf, dtype=F64)
    bp = torch.cat([t1, t2], -1)
    ok = torch.cat([nz, nz], -1) & torch.isfinite(bp)
    bp = torch.where(ok, bp, inf).sort(-1).values
    count = ok.sum(-1)
    last = bp.shape[-1] - 1
    lo_i = torch.full((nrow,), -1, dtype=torch.long, device=lam.device)
    hi_i = count.clone()
    while True:  # largest j with f(b_j) >= d (f is non-increasing)
        open_ = hi_i - lo_i > 1
        if not bool(open_.any()):
            break
        mid = torch.div(lo_i + hi_i, 2, rounding_mode="floor")
        at = bp.gather(-1, mid.clamp(0, last).unsqueeze(-1)).squeeze(-1)
        r, _, _ = f(torch.where(open_, at, 0.0))
        right = open_ & (r >= 0)
        lo_i = torch.where(right, mid, lo_i)
        hi_i = torch.where(open_ & ~right, mid, hi_i)
    left = torch.where(lo_i >= 0, bp.gather(-1, lo_i.clamp(0, last)[:, None])[:, 0], -inf)
    right = torch.where(hi_i < count, bp.gather(-1, hi_i.clamp(0, last)[:, None])[:, 0], inf)
    fl, fr = torch.isfinite(left), torch.isfinite(right)
    # a point inside the segment: no breakpoint inside it, f is linear there
    p = torch.where(fl & fr, left + 0.5 * (right - left), 0.0)
    p = torch.where(fl & ~fr, left + left.abs().clamp_min(1.0), p)
    p = torch.where(~fl & fr, right - right.abs().clamp_min(1.0), p)
    r, s, _ = f(p)
    new = torch.where(s > 0, p + r / s, p)
    done = ~todo
    result = lam.clone()
    for cand in (new, torch.where(fl, left, new), torch.where(fr, right, new)):
        r2, _, scale2 = f(torch.where(done, result, cand), want_scale=True)
        hit = ~done & (r2.abs() <= 4 * RTOL * scale2)
        result = torch.where(hit, cand, result)
        done = done | hit
    if not bool(done.all()):
        _raise_infeasible(prob, rs, ~done)
    return result


def _raise_infeasible(prob: _Problem, rs: slice, bad: Tensor) -> None:
    u, c, a, _, lo, hi, _ = prob.load(rs, slice(None))
    full = (bad.shape[0], prob.n)
    x0 = u if lo is None and hi is None else torch.clamp(u, lo, hi)
    neg_inf = torch.full(full, -math.inf, dtype=F64)
    pos_inf = torch.full(full, math.inf, dtype=F64)
    lo_ = neg_inf if lo is None else lo.expand(full)
    hi_ = pos_inf if hi is None else hi.expand(full)

    def at_end(x_pos: Tensor, x_neg: Tensor) -> Tensor:  # every movable entry at a bound
        x = torch.where(a > 0, x_pos, torch.where(a < 0, x_neg, x0))
        return torch.where(c != 0, c * x, 0.0).expand(full).sum(-1)

    low = at_end(lo_, hi_)  # lam -> +inf (f non-increasing: its infimum)
    high = at_end(hi_, lo_)  # lam -> -inf
    rows = torch.arange(rs.start, rs.stop, device=bad.device)[bad]
    d = prob.d[rs][bad]
    raise _infeasible(prob.call, prob.shape[:-1], rows, d, low[bad], high[bad])


def _solve_rows(prob: _Problem, force_sort: bool = False) -> tuple[Tensor, Tensor]:
    """All groups; returns (x in the output dtype (R, n), lam float64 (R,))."""
    out = torch.empty((prob.rows, prob.n), dtype=prob.out_dtype, device=prob.u.device)
    lam = torch.empty(prob.rows, dtype=F64, device=prob.u.device)
    per = max(1, CHUNK // max(prob.n, 1))
    for r0 in range(0, prob.rows, per):
        rs = slice(r0, min(r0 + per, prob.rows))
        lam[rs] = _solve_group(prob, rs, out, force_sort)
    return out, lam


class _BoundedRows(torch.autograd.Function):
    """x = argmin over the box and the rows; backward: the implicit function theorem on the
    active set (free entries: the equality-only projection restricted to the free set)."""

    @staticmethod
    def forward(ctx, u, c, d, w, lo, hi, shape, out_dtype, call, force_sort):
        if math.prod(shape) == 0:
            x = torch.empty(shape, dtype=out_dtype, device=u.device)
            lam = torch.empty(shape[:-1], dtype=F64, device=u.device)
        else:
            prob = _Problem(u, c, w, lo, hi, d, shape, out_dtype, call)
            x2, lam2 = _solve_rows(prob, force_sort)
            x, lam = x2.reshape(shape), lam2.reshape(shape[:-1])
        ctx.save_for_backward(u, c, d, w, lo, hi, lam)
        ctx.shape = shape
        ctx.mark_non_differentiable(lam)
        return x, lam

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _glam):
        u, c, d, w, lo, hi, lam = ctx.saved_tensors
        shape = ctx.shape
        if g is None or math.prod(shape) == 0:
            return (None,) * 10
        g64 = g.to(F64).expand(shape)
        u64, c64 = u.to(F64).expand(shape), c.to(F64).expand(shape)
        w64 = None if w is None else w.to(F64).expand(shape)
        a = c64 if w64 is None else w64 * c64
        lam_ = lam.unsqueeze(-1)
        v = u64 - a * lam_
        free = torch.ones(shape, dtype=torch.bool, device=u.device)
        lo64 = None if lo is None else lo.to(F64)
        hi64 = None if hi is None else hi.to(F64)
        if lo64 is not None:
            free = free & (v > lo64)
        if hi64 is not None:
            free = free & (v < hi64)
        low = None
        if lo64 is not None:
            low = ~free & (v <= lo64)
        up = None if hi64 is None else (~free if low is None else ~free & ~low)
        S = torch.where(free, a * c64, 0.0).sum(-1, keepdim=True)
        gam = torch.where(free, g64 * a, 0.0).sum(-1, keepdim=True)
        kappa = torch.where(S > 0, gam / torch.where(S > 0, S, 1.0), 0.0)
        core = g64 - kappa * c64
        need = ctx.needs_input_grad
        gu = torch.where(free, core, 0.0)
        out = [None] * 10
        if need[0]:
            out[0] = gu.sum_to_size(u.shape).to(u.dtype)
        if need[1]:
            ww = 1.0 if w64 is None else w64
            x = v if lo64 is None and hi64 is None else torch.clamp(v, lo64, hi64)
            dn = torch.where(free, u64 - 2 * lam_ * ww * c64, x)
            gc = -kappa * dn + torch.where(free, -g64 * ww * lam_, 0.0)
            out[1] = gc.sum_to_size(c.shape).to(c.dtype)
        if need[2]:
            out[2] = kappa.squeeze(-1).sum_to_size(d.shape).to(d.dtype)
        if need[3]:
            out[3] = (-lam_ * c64 * gu).sum_to_size(w.shape).to(w.dtype)
        if need[4] and low is not None:
            out[4] = torch.where(low, core, 0.0).sum_to_size(lo.shape).to(lo.dtype)
        if need[5] and up is not None:
            out[5] = torch.where(up, core, 0.0).sum_to_size(hi.shape).to(hi.dtype)
        return tuple(out)


def project_bounded_rows(
    u: Tensor,
    coef: Tensor,
    total: float | Tensor,
    *,
    weight: Tensor | None = None,
    lower: Bound = None,
    upper: Bound = None,
    _force_sort: bool = False,
) -> Tensor:
    """Project onto disjoint equality rows and box bounds with a diagonal metric (exact).

    Solves, for every row ``m`` (and every sample of the batch) independently::

        minimise   sum_i (x_i - u_i)^2 / w_i
        subject to sum_i c_i x_i = d_m   and   lower_i <= x_i <= upper_i

    over the entries ``i`` of the row. The solution is ``x_i = clip(u_i - w_i c_i lam_m, lower_i,
    upper_i)`` with the multiplier ``lam_m`` found exactly from the piecewise-linear monotone
    equation ``sum_i c_i x_i(lam) = d_m`` (see the module docstring). Entries with ``w_i = 0``
    are fixed (they must lie in their bounds); entries with ``c_i = 0`` belong to no row and are
    only brought into their bounds.

    Parameters
    ----------
    u : Tensor
        shape: (*batch, M, n). The prediction: ``M`` rows (e.g. time frames) of ``n`` entries
        each (e.g. the flattened spatial grid of a frame).
    coef : Tensor
        shape: broadcastable to (*batch, M, n). The row coefficients ``c`` (quadrature weights);
        ``(n,)`` for one rule shared by all rows.
    total : float or Tensor
        shape: broadcastable to (*batch, M). The right-hand sides ``d``.
    weight : Tensor, optional
        shape: broadcastable to (*batch, M, n). The diagonal metric ``w >= 0`` (variances or
        mobilities; 0 fixes an entry). Default: 1 (the Euclidean projection).
    lower, upper : float or Tensor, optional
        shape: broadcastable to (*batch, M, n). Bounds (``-inf`` / ``+inf`` allowed); None: none.
        They are rounded to the output dtype.

    Returns
    -------
    Tensor
        shape: (*batch, M, n) (the broadcast shape), the dtype of ``u`` promoted with that of
        ``weight``. Differentiable with respect to every tensor argument (the implicit function
        theorem on the active set; at a kink, a bound touched exactly, the one-sided gradient
        of the bound).

    Raises
    ------
    TypeError
        A non-tensor, or an integer tensor.
    ValueError
        Shapes that do not broadcast; NaN or inf in ``u``, ``coef``, ``weight`` or ``total``;
        NaN in a bound; ``lower > upper``; a negative weight.
    ConstraintError
        Infeasible data: a row whose total lies outside the range that the bounds and the fixed
        entries allow (the message names the rows, the totals and the reachable ranges), or a
        fixed entry outside its bounds.

    Notes
    -----
    Cost: the rows are processed in groups of about ``CHUNK`` values held in cache; each group
    takes a few Newton steps on that data (about 2 when no bound is active, 3 to 6 otherwise),
    so the inputs are read once and the result written once for rows up to ``CHUNK`` entries.
    Longer rows take one pass over the row per step. The caller's tensors are never modified.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers._bounded import project_bounded_rows
    >>> u = torch.tensor([[0.5, -0.2, 1.0, 0.3]], dtype=torch.float64)   # one row
    >>> x = project_bounded_rows(u, torch.ones(4), 1.2, lower=0.0)
    >>> x
    tensor([[0.3000, 0.0000, 0.8000, 0.1000]], dtype=torch.float64)
    >>> round(float(x.sum()), 12)
    1.2
    """
    call = "project_bounded_rows"
    if not isinstance(u, Tensor):
        raise TypeError(
            f"{call}: u must be a torch.Tensor of shape (*batch, M, n), got {type(u).__name__}."
        )
    _tensor(u, "u", call)
    if u.ndim < 2:
        raise ValueError(
            f"{call}: u must have shape (*batch, M, n) (rows, then their entries), got shape "
            f"{tuple(u.shape)}. Add a row axis with u.unsqueeze(-2) for one row."
        )
    c = _tensor(coef, "coef", call)
    d = _tensor(total, "total", call)
    w = _tensor(weight, "weight", call, allow_none=True)
    lo = _tensor(lower, "lower", call, allow_none=True)
    hi = _tensor(upper, "upper", call, allow_none=True)
    shapes = {"u": tuple(u.shape), "coef": tuple(c.shape)}
    for name, t in (("weight", w), ("lower", lo), ("upper", hi)):
        if t is not None:
            shapes[name] = tuple(t.shape)
    shapes["total (with a trailing axis)"] = (*d.shape, 1)
    shape = _broadcast(shapes, call)
    out_dtype = u.dtype if w is None else torch.promote_types(u.dtype, w.dtype)
    _finite_check({"total": d}, call)
    dev = u.device
    c, d = c.to(dev), d.to(dev)
    w = None if w is None else w.to(dev)
    # bounds rounded to the output dtype: the result (in that dtype) lies in them exactly
    lo = None if lo is None else lo.to(dev, out_dtype if lo.dtype != out_dtype else lo.dtype)
    hi = None if hi is None else hi.to(dev, out_dtype if hi.dtype != out_dtype else hi.dtype)
    x, _ = _BoundedRows.apply(u, c, d, w, lo, hi, shape, out_dtype, call, _force_sort)
    return x


# ---------------------------------------------------------------------------- general path
def active_bounds(value: Tensor, lower: Bound = None, upper: Bound = None) -> Tensor:
    """Where a bounded result sits on a bound: the entries whose variance the layer sets to 0.

    The Gaussian semantics (module docstring): the bounded mean is the mode of the conditioned
    Gaussian restricted to the box; the variance is 0 where a bound is active and the free
    entries are conditioned on the equality rows over the free set.

    Parameters
    ----------
    value : Tensor
        shape: (*shape). A result of :func:`project_bounded_rows` or :func:`project_bounded`.
    lower, upper : float or Tensor, optional
        shape: broadcastable to ``value``. The bounds the result was computed with.

    Returns
    -------
    Tensor
        shape: (*shape), bool: ``value <= lower`` or ``value >= upper`` (equality, since the
        result lies in the bounds).

    Examples
    --------
    >>> import torch
    >>> from constraint_layers._bounded import active_bounds
    >>> active_bounds(torch.tensor([0.0, 0.5, 1.0]), lower=0.0, upper=1.0)
    tensor([ True, False,  True])
    """
    call = "active_bounds"
    if not isinstance(value, Tensor):
        raise TypeError(f"{call}: value must be a torch.Tensor, got {type(value).__name__}.")
    lo = _tensor(lower, "lower", call, allow_none=True)
    hi = _tensor(upper, "upper", call, allow_none=True)
    act = torch.zeros(value.shape, dtype=torch.bool, device=value.device)
    v = value.detach()
    if lo is not None:
        act = act | (v <= lo.to(v.device, v.dtype))
    if hi is not None:
        act = act | (v >= hi.to(v.device, v.dtype))
    return act


def _row_ranges(c, u, fixed, lo, hi) -> tuple[Tensor, Tensor]:
    """Per row, the range of ``c . x`` over the box with fixed entries at ``u``; c: (M, N)."""
    N = u.shape[-1]
    lo_ = torch.full((N,), -math.inf, dtype=F64) if lo is None else lo.expand(N)
    hi_ = torch.full((N,), math.inf, dtype=F64) if hi is None else hi.expand(N)
    lo_ = torch.where(fixed, u, lo_)
    hi_ = torch.where(fixed, u, hi_)
    small = torch.where(c > 0, c * lo_, torch.where(c < 0, c * hi_, 0.0)).sum(-1)
    big = torch.where(c > 0, c * hi_, torch.where(c < 0, c * lo_, 0.0)).sum(-1)
    return small, big


def _gi_active_set(
    u: Tensor,  # (N,) float64
    C: Tensor,  # (M, N)
    d: Tensor,  # (M,)
    W: Tensor,  # (N, N) dense metric (PSD)
    lo: Tensor | None,  # (N,) or None
    hi: Tensor | None,  # (N,) or None
    call: str,
    where: str,
) -> tuple[list[int], list[float]]:
    """Goldfarb-Idnani dual active set for min (x-u)^T W^-1 (x-u), C x = d, lo <= x <= hi.

    Inequalities ``s_j(x) = n_j^T x - b_j >= 0``: a lower bound ``n = e_i``, an upper bound
    ``n = -e_i``. Returns the active bounds as (entry index, sign) pairs, sign +1 lower, -1 upper.
    All quantities are expressed with ``W`` (never its inverse): for the active normals ``Nm``
    (columns), ``H = W - W Nm (Nm^T W Nm)^{-1} Nm^T W`` and ``N* = (Nm^T W Nm)^{-1} Nm^T W``.
    """
    N = u.shape[0]
    M = C.shape[0]
    WC = W @ C.T  # (N, M)
    act: list[int] = []
    sign: list[float] = []
    mult: list[float] = []  # multipliers of the active bounds (>= 0)

    def system():
        cols = [WC] + ([(W[:, act] * torch.tensor(sign, dtype=F64))] if act else [])
        WN = torch.cat(cols, 1)  # (N, k)
        rowsN = torch.cat([C, _unit_rows(act, sign, N)], 0)  # (k, N)
        return WN, rowsN @ WN, rowsN

    def project():
        WN, A, rowsN = system()
        e = torch.cat(
            [d, torch.tensor([(lo if s > 0 else hi)[i] * s for i, s in zip(act, sign)], dtype=F64)]
        )
        nu = torch.linalg.solve(A, rowsN @ u - e)
        return u - WN @ nu

    if M:
        A0 = C @ WC
        _, info = torch.linalg.cholesky_ex(A0)
        if int(info) != 0:
            raise SingularConstraintError(
                f"{call}: the constraint rows{where} are linearly dependent in the metric (C W "
                "C^T is singular: duplicate rows, or a row whose entries all have zero weight)."
            )
        x = project()
    else:
        x = u.clone()
    scale = float(u.abs().amax()) if N else 0.0
    for t in (lo, hi):
        if t is not None:
            fin = t[torch.isfinite(t)]
            scale = max(scale, float(fin.abs().amax()) if fin.numel() else 0.0)
    tol = 1e3 * EPS * max(scale, 1e-300)
    wdiag = W.diagonal()
    for _ in range(10 * (N + M) + 10):
        slack = torch.full((2, N), math.inf, dtype=F64)
        if lo is not None:
            slack[0] = x - lo
        if hi is not None:
            slack[1] = hi - x
        for i, s in zip(act, sign):
            slack[0 if s > 0 else 1, i] = math.inf
        k = int(slack.argmin())
        if not float(slack.flatten()[k]) < -tol:
            return act, sign
        side, p = divmod(k, N)
        sp = 1.0 if side == 0 else -1.0
        up = 0.0  # the multiplier of the bound being added
        while True:
            WN, A, _ = system()
            Wn = W[:, p] * sp
            rvec = torch.linalg.solve(A, WN[p] * sp) if A.numel() else A.new_zeros(0)
            z = Wn - WN @ rvec
            zn = float(z[p]) * sp
            sval = float(x[p] - lo[p]) if sp > 0 else float(hi[p] - x[p])
            t2 = -sval / zn if zn > 1e-13 * max(float(wdiag[p]), 1e-300) else math.inf
            r_in = rvec[M:]
            t1, kdrop = math.inf, -1
            for j in range(len(act)):
                if float(r_in[j]) > 0:
                    tj = mult[j] / float(r_in[j])
                    if tj < t1:
                        t1, kdrop = tj, j
            t = min(t1, t2)
            if math.isinf(t):
                raise ConstraintError(
                    f"{call}: no value within the bounds satisfies the constraint rows{where} "
                    f"jointly (the bound {'lower' if sp > 0 else 'upper'} at entry {p} cannot be "
                    "met together with the rows and the other bounds): check the totals, the "
                    "bounds and the fixed (zero-weight) entries."
                )
            if not math.isinf(t2):
                x = x + t * z
            for j in range(len(act)):
                mult[j] -= t * float(r_in[j])
            up += t
            if t == t2:
                act.append(p)
                sign.append(sp)
                mult.append(up)
                x = project()  # re-derive x from the active set (no drift)
                break
            del act[kdrop], sign[kdrop], mult[kdrop]
    raise RuntimeError(f"{call}: the active-set method did not terminate{where}.")


def _unit_rows(act: list[int], sign: list[float], N: int) -> Tensor:
    E = torch.zeros((len(act), N), dtype=F64)
    if act:
        E[torch.arange(len(act)), torch.tensor(act)] = torch.tensor(sign, dtype=F64)
    return E


def project_bounded(
    u: Tensor,
    C: Tensor,
    total: float | Tensor,
    *,
    weight: Tensor | None = None,
    covariance: Tensor | None = None,
    lower: Bound = None,
    upper: Bound = None,
) -> Tensor:
    """Project onto general equality rows and box bounds in a dense metric (exact active set).

    Solves ``minimise (x - u)^T W^{-1} (x - u)`` subject to ``C x = d`` and
    ``lower <= x <= upper``, for each sample, with ``W = covariance`` (dense, symmetric positive
    semidefinite), ``W = diag(weight)``, or ``W = I``. The rows may overlap. The active set comes
    from the Goldfarb-Idnani dual method; the result is the equality-only projection onto the
    rows plus the active bounds, so it is differentiable (autograd through that formula: the
    implicit function theorem on the active set).

    Parameters
    ----------
    u : Tensor
        shape: (*batch, N). The prediction (flattened output).
    C : Tensor
        shape: (M, N) or (*batch, M, N). Equality rows (``M`` small); (0, N) for none.
    total : float or Tensor
        shape: broadcastable to (*batch, M). Right-hand sides ``d``.
    weight : Tensor, optional
        shape: broadcastable to (*batch, N). A diagonal metric (0 fixes an entry).
    covariance : Tensor, optional
        shape: (N, N) or (*batch, N, N). A dense metric (a Gaussian's covariance).
    lower, upper : float or Tensor, optional
        shape: broadcastable to (*batch, N). Bounds (``-inf`` / ``+inf`` allowed).

    Returns
    -------
    Tensor
        shape: (*batch, N), the dtype of ``u`` promoted with the metric's.

    Raises
    ------
    TypeError, ValueError
        Bad types, shapes, NaN values, ``lower > upper``, both ``weight`` and ``covariance``.
    SingularConstraintError
        Rows that are dependent in the metric.
    ConstraintError
        Infeasible data (names the rows, the totals and the reachable ranges).

    Examples
    --------
    >>> import torch
    >>> from constraint_layers._bounded import project_bounded
    >>> u = torch.tensor([0.5, -0.2, 1.0, 0.3], dtype=torch.float64)
    >>> C = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, -1.0]], dtype=torch.float64)
    >>> x = project_bounded(u, C, torch.tensor([1.2, 0.0]), lower=0.0)
    >>> x
    tensor([0.3000, 0.0000, 0.4500, 0.4500], dtype=torch.float64)
    """
    call = "project_bounded"
    if not isinstance(u, Tensor):
        raise TypeError(
            f"{call}: u must be a torch.Tensor of shape (*batch, N), got {type(u).__name__}."
        )
    _tensor(u, "u", call)
    if u.ndim < 1:
        raise ValueError(f"{call}: u must have shape (*batch, N), got a scalar.")
    C = _tensor(C, "C", call)
    d = _tensor(total, "total", call)
    w = _tensor(weight, "weight", call, allow_none=True)
    S = _tensor(covariance, "covariance", call, allow_none=True)
    lo = _tensor(lower, "lower", call, allow_none=True)
    hi = _tensor(upper, "upper", call, allow_none=True)
    if w is not None and S is not None:
        raise ValueError(f"{call}: pass weight (a diagonal) or covariance (dense), not both.")
    N = u.shape[-1]
    if C.ndim < 2 or C.shape[-1] != N:
        raise ValueError(
            f"{call}: C must have shape (M, {N}) or (*batch, M, {N}) for u with {N} entries in "
            f"its last axis, got {tuple(C.shape)}."
        )
    M = C.shape[-2]
    if S is not None and (S.ndim < 2 or S.shape[-1] != N or S.shape[-2] != N):
        raise ValueError(
            f"{call}: covariance must have shape ({N}, {N}) or (*batch, {N}, {N}), got "
            f"{tuple(S.shape)}."
        )
    shapes = {"u": tuple(u.shape[:-1]), "C": tuple(C.shape[:-2]), "total": tuple(d.shape[:-1])}
    if d.ndim and d.shape[-1] not in (1, M):
        raise ValueError(
            f"{call}: total must hold one value per row ({M}), got shape {tuple(d.shape)}."
        )
    for name, t in (("weight", w), ("lower", lo), ("upper", hi)):
        if t is not None:
            if t.ndim and t.shape[-1] not in (1, N):
                raise ValueError(
                    f"{call}: {name} must broadcast to (*batch, {N}), got shape {tuple(t.shape)}."
                )
            shapes[name] = tuple(t.shape[:-1])
    if S is not None:
        shapes["covariance"] = tuple(S.shape[:-2])
    batch = _broadcast(shapes, call)
    metric_dtype = (w if w is not None else S).dtype if (w is not None or S is not None) else None
    out_dtype = u.dtype if metric_dtype is None else torch.promote_types(u.dtype, metric_dtype)
    _finite_check({"u": u, "C": C, "total": d, "weight": w, "covariance": S}, call)
    _finite_check({"lower": lo, "upper": hi}, call, bounds=True)
    _check_order(lo, hi, call)
    _check_weight(w, call)
    if S is not None:
        _check_weight(S.diagonal(dim1=-2, dim2=-1), call)
    B = math.prod(batch)
    uB = u.expand(*batch, N).reshape(B, N)
    CB = C.expand(*batch, M, N).reshape(B, M, N)
    dB = d.expand(*batch, M).reshape(B, M)
    loB = None if lo is None else lo.to(u.device, out_dtype).expand(*batch, N).reshape(B, N)
    hiB = None if hi is None else hi.to(u.device, out_dtype).expand(*batch, N).reshape(B, N)
    if S is not None:
        WB = S.expand(*batch, N, N).reshape(B, N, N)
    elif w is not None:
        WB = w.expand(*batch, N).reshape(B, N)
    else:
        WB = None
    outs = []
    for b in range(B):
        where = f" (sample {tuple(torch.unravel_index(torch.tensor(b), batch))})" if batch else ""
        where = where.replace("(tensor(", "(").replace("),)", ",)")
        outs.append(_dense_one(uB[b], CB[b], dB[b], WB, b, loB, hiB, out_dtype, call, where))
    if not outs:
        return torch.empty((*batch, N), dtype=out_dtype, device=u.device)
    return torch.stack(outs).reshape(*batch, N)


def _dense_one(u, C, d, WB, b, loB, hiB, out_dtype, call, where) -> Tensor:
    N = u.shape[-1]
    with torch.no_grad():
        u64, C64, d64 = u.detach().to(F64), C.detach().to(F64), d.detach().to(F64)
        if WB is None:
            W = torch.eye(N, dtype=F64)
        elif WB.ndim == 3:
            W = WB[b].detach().to(F64)
        else:
            W = torch.diag(WB[b].detach().to(F64))
        lo = None if loB is None else loB[b].detach().to(F64)
        hi = None if hiB is None else hiB[b].detach().to(F64)
        fixed = W.diagonal() == 0
        if bool(fixed.any()):
            _check_fixed(u64, fixed, lo, hi, call)
        low, high = _row_ranges(C64, u64, fixed, lo, hi)
        span = C64.abs() @ u64.abs() + d64.abs()
        bad = (d64 < low - 1e-12 * span) | (d64 > high + 1e-12 * span)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0]
            raise _infeasible(call + where, (C64.shape[0],), rows, d64[bad], low[bad], high[bad])
        # rows with no movable entry already hold (checked above): leave them out
        keep = (C64 * (C64 @ W)).sum(-1) > 0
        act, sign = _gi_active_set(u64, C64[keep], d64[keep], W, lo, hi, call, where)
    C, d = C[keep], d[keep]
    # the solution on the active set, with autograd: rows + active bounds as equality rows
    W = (
        torch.eye(N, dtype=F64, device=u.device)
        if WB is None
        else (WB[b].to(F64) if WB.ndim == 3 else torch.diag(WB[b].to(F64)))
    )
    E = torch.cat([C.to(F64), _unit_rows(act, sign, N).to(u.device)], 0)
    if act:
        ia = torch.tensor(act, device=u.device)
        sg = torch.tensor(sign, dtype=F64, device=u.device)
        bl = torch.where(
            sg > 0,
            loB[b][ia].to(F64) if loB is not None else 0.0,
            hiB[b][ia].to(F64) if hiB is not None else 0.0,
        )
        e = torch.cat([d.to(F64), sg * bl])
    else:
        e = d.to(F64)
    u64 = u.to(F64)
    x = u64
    if E.shape[0]:
        WE = W @ E.T
        x = u64 - WE @ torch.linalg.solve(E @ WE, E @ u64 - e)
    # bounds exactly: active entries at their bound, the rest clipped by at most rounding
    # (a value correction that keeps the gradient of the formula)
    xd = x.detach()
    xc = xd
    if loB is not None:
        xc = torch.maximum(xc, loB[b].detach().to(F64))
    if hiB is not None:
        xc = torch.minimum(xc, hiB[b].detach().to(F64))
    x = x + (xc - xd)
    if act:
        val = torch.where(
            sg > 0,
            loB[b][ia].to(F64) if loB is not None else 0.0,
            hiB[b][ia].to(F64) if hiB is not None else 0.0,
        )
        x = x.index_put((ia,), val)
    return x.to(out_dtype)
