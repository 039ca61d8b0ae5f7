"""The separable bounded projection: one multiplier per row from its piecewise-linear equation
(private; see the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import (
    CHUNK,
    EPS,
    F64,
    GROUP,
    MAX_NEWTON,
    RTOL,
    Bound,
    _broadcast,
    _check_fixed,
    _check_order,
    _check_weight,
    _finite_check,
    _infeasible,
    _tensor,
)

__all__ = ["project_bounded_rows"]


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


def _evaluate(blk: tuple, lam: Tensor | None, out: Tensor | None = None, scale: bool = False):
    """Row sums of one block at ``lam`` (rows, 1) float64 (None: 0): (sum c x, slope,
    sum |c x| or None).

    The slope counts the entries with ``x == v`` (free, or exactly at a bound: a tie, the slope
    of one side). The indicator is formed as ``1 - |sign(v - x)|`` in float arithmetic (several
    times faster on CPU than a boolean mask and ``where``).
    """
    u, c, a, ac, lo, hi, _ = blk
    v = u if lam is None else torch.addcmul(u, a, lam, value=-1.0)  # u - a lam (None: 0)
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
        # the first evaluation is at lam = 0 (Newton's start, or force_sort's check): x = clip(u)
        lam_ = None if first else lam.unsqueeze(-1)
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
            # x is written at every step but the first (at lam = 0 the rows rarely hold already)
            r, s, sc = f(lam, write=it > 0, first=it == 0)
            if it == 0:  # the rounding scale of the row sums: sum |c x| + |d| at the start
                tol = RTOL * sc
            todo = ~(r.abs() <= tol)
            if not bool(todo.any()):
                if it == 0:
                    f(lam, write=True)
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
    per = max(1, GROUP // max(prob.n, 1))
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
    Cost: rows are processed in groups of about ``GROUP`` values (rows longer than ``CHUNK`` in
    blocks of ``CHUNK`` values); each group
    takes a few Newton steps on that data (about 2 when no bound is active, 3 to 6 otherwise),
    so the inputs are read once and the result written once for rows up to ``CHUNK`` entries.
    Longer rows take one pass over the row per step. The caller's tensors are never modified.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers._engine.bounded import project_bounded_rows
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
