"""The general bounded projection: a dual active-set method on the stacked rows (private; see
the package docstring)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._tolerance import ACTIVE_SET_ROUNDING, BOUNDED_JITTER, FEASIBILITY_RTOL
from ...errors import ConstraintError, SingularConstraintError
from .checks import (
    EPS,
    F64,
    Bound,
    _broadcast,
    _check_fixed,
    _check_order,
    _check_weight,
    _finite_check,
    _infeasible,
    _tensor,
)

__all__ = ["active_bounds", "project_bounded"]


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
    >>> from constraint_layers._engine.bounded import active_bounds
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
    tol = ACTIVE_SET_ROUNDING * EPS * max(scale, 1e-300)
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


#: Relative jitters (times the largest variance) tried on a numerically singular dense metric.
JITTER = BOUNDED_JITTER


def _jittered(W: Tensor, fixed: Tensor, jitter: float) -> Tensor:
    """``W + jitter I`` on the movable entries (fixed entries keep their zero row)."""
    if not jitter:
        return W
    return W + torch.diag(torch.where(fixed, 0.0, jitter).to(W.dtype))


def _free(bound: Tensor | None, idx: Tensor, value: float) -> Tensor | None:
    """``bound`` with its entries ``idx`` set to ``value`` (an infinite bound: none)."""
    if bound is None or not idx.numel():
        return bound
    out = bound.clone()
    out[idx] = value
    return out


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
    from the Goldfarb-Idnani dual method (finite; each of its steps re-solves dense systems,
    ``O(N k^2)``, so ``O(N k^3)`` in all for ``k`` active bounds; a primal-dual active-set
    search in the ``W`` form was tried and measured to cycle on smooth covariances, an RBF kernel
    or a GP posterior, ``tests/benchmarks/bench_bounded_general.py``). A
    row whose total is an end of its reachable range pins its entries to their bounds (unit rows
    in its place); a metric in which the rows do not factor gets a relative jitter (``JITTER``
    times the largest variance) on its diagonal. The result is the equality-only projection onto
    the rows plus the active bounds (refined iteratively), so it is differentiable (autograd
    through that formula: the implicit function theorem on the active set).

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
    >>> from constraint_layers._engine.bounded import project_bounded
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


def _at_bound(idx: Tensor, sign: Tensor, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    """The bound values of entries ``idx`` (sign +1: lower, -1: upper)."""
    lv = lo[idx] if lo is not None else torch.zeros_like(sign)
    hv = hi[idx] if hi is not None else torch.zeros_like(sign)
    return torch.where(sign > 0, lv, hv)


def _forced(C, d, low, high, span, fixed, lo, hi, call) -> tuple[Tensor, Tensor]:
    """Entries a row pins to a bound: a row whose total is an end of its reachable range (to
    the tolerance of the feasibility check) holds only with every movable entry it touches at
    the bound that gives that end (e.g. a zero total of non-negative values). Returns their
    indices, their signs (+1 lower, -1 upper) and the (M,) mask of such rows (implied by the
    pinned entries)."""
    tol = FEASIBILITY_RTOL * span
    t_lo = (d <= low + tol) & torch.isfinite(low)  # (M,)
    t_hi = (d >= high - tol) & torch.isfinite(high)
    touch = (C != 0) & ~fixed  # (M, N)
    pos, neg = touch & (C > 0), touch & (C < 0)
    to_lo = ((pos & t_lo[:, None]) | (neg & t_hi[:, None])).any(0)
    to_hi = ((neg & t_lo[:, None]) | (pos & t_hi[:, None])).any(0)
    both = to_lo & to_hi
    if bool(both.any()):
        differ = both & (lo != hi)  # both ends pinned: lo and hi exist
        if bool(differ.any()):
            i = int(differ.nonzero()[0])
            raise ConstraintError(
                f"{call}: no value within the bounds satisfies the constraint rows jointly: "
                f"rows at the ends of their reachable ranges pin entry {i} to its lower and to "
                "its upper bound: check the totals, the bounds and the fixed (zero-weight) "
                "entries."
            )
        to_hi = to_hi & ~both
    idx = (to_lo | to_hi).nonzero().squeeze(-1)
    return idx, torch.where(to_lo[idx], 1.0, -1.0).to(F64), t_lo | t_hi


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
        bad = (d64 < low - FEASIBILITY_RTOL * span) | (d64 > high + FEASIBILITY_RTOL * span)
        if bool(bad.any()):
            rows = bad.nonzero()[:, 0]
            raise _infeasible(call + where, (C64.shape[0],), rows, d64[bad], low[bad], high[bad])
        # rows at an end of their reachable range pin their entries to bounds: those entries
        # become equality rows (unit rows) in place of the rows (which they imply)
        forced, fsign, tight = _forced(C64, d64, low, high, span, fixed, lo, hi, call + where)
        rows = ~tight
        Cx = torch.cat([C64[rows], _unit_rows(forced.tolist(), [1.0] * forced.numel(), N)])
        dx = torch.cat([d64[rows], _at_bound(forced, fsign, lo, hi)])
        # rows with no movable entry already hold (checked above): leave them out
        keep = (Cx * (Cx @ W)).sum(-1) > 0
        Ck, dk = Cx[keep], dx[keep]
        lo_s, hi_s = (
            _free(lo, forced, -math.inf),
            _free(hi, forced, math.inf),
        )  # pinned entries: held by their rows
        jitter = 0.0
        # a numerically singular metric (a GP posterior covariance, PSD only to rounding): a
        # relative jitter on the diagonal of the movable entries, raised until the rows (with
        # the pinned entries) factor in the metric; the active set is searched in that metric
        # (rows that do not factor with any of them: the method raises, naming them)
        top = float(W.diagonal().amax()) if N else 0.0
        for rel in JITTER:
            if int(torch.linalg.cholesky_ex(Ck @ _jittered(W, fixed, rel * top) @ Ck.T)[1]) == 0:
                jitter = rel * top
                break
        act, sign = _gi_active_set(
            u64, Ck, dk, _jittered(W, fixed, jitter), lo_s, hi_s, call, where
        )
    dev = u.device
    bf = _at_bound(
        forced.to(dev),
        fsign.to(dev),
        None if loB is None else loB[b].to(F64),
        None if hiB is None else hiB[b].to(F64),
    )
    pinned = _unit_rows(forced.tolist(), [1.0] * forced.numel(), N).to(dev)
    C = torch.cat([C.to(F64)[rows.to(dev)], pinned])
    d = torch.cat([d.to(F64)[rows.to(dev)], bf])
    C, d = C[keep.to(u.device)], d[keep.to(u.device)]
    # the solution on the active set, with autograd: rows + active bounds as equality rows
    W = (
        torch.eye(N, dtype=F64, device=u.device)
        if WB is None
        else (WB[b].to(F64) if WB.ndim == 3 else torch.diag(WB[b].to(F64)))
    )
    # the metric the active set was found in (a constant shift: same gradients)
    W = _jittered(W, W.diagonal().detach() == 0, jitter)
    C = C.to(F64)
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
    if C.shape[0] or act:
        # E = [C; diag(sg) I_A] (rows and active bounds), without forming E or W E^T densely:
        # W E^T = [W C^T, W[:, A] diag(sg)], E W E^T and E u by rows
        WE = W @ C.T
        Eu = C @ u64
        if act:
            WE = torch.cat([WE, W[:, ia] * sg], 1)
            Eu = torch.cat([Eu, u64[ia] * sg])
        EWE = C @ WE
        if act:
            EWE = torch.cat([EWE, WE[ia] * sg.unsqueeze(-1)], 0)
        x = u64 - WE @ torch.linalg.solve(EWE, Eu - e)
        # iterative refinement of the values (an ill-conditioned E W E^T, e.g. a GP covariance):
        # the residual's correction, a value correction that keeps the gradient of the formula
        with torch.no_grad():
            LU, piv = torch.linalg.lu_factor(EWE.detach())
            xr = x.detach()
            for _ in range(2):
                r = torch.cat([C.detach() @ xr, xr[ia] * sg] if act else [C.detach() @ xr]) - e
                xr = xr - WE.detach() @ torch.linalg.lu_solve(LU, piv, r.unsqueeze(-1))[:, 0]
        x = x + (xr - x.detach())
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
    if forced.numel():  # the entries rows pin to a bound: exactly there
        x = x.index_put((forced.to(u.device),), bf)
    return x.to(out_dtype)
