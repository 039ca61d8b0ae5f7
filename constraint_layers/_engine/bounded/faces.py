"""The bounded Euclidean projection with the boundary step eliminated (private).

With boundary rows on a deterministic output the step ``B(v) = S v + f`` keeps its meaning (the
face-local rows are eliminated: the values the step sets are affine in the others), and what is
left is, for each sample (the batch iterates together, each sample with its own active sets)::

    minimise   |v - u|^2
    subject to E v = e                 (the few dense rows on the freedom left: G' = G S)
               lo <= v <= hi           (the bounds on the values the step leaves unchanged)
               l <= W v <= h           (the bounds on the values the step sets: W = S's rows there)

Method (exact; finite once the active sets settle): the dual. Every wall bound is an inequality
row ``R_i v >= r_i`` (``W_m`` with ``l_m``, ``-W_m`` with ``-h_m``; an infinite one keeps its
multiplier at 0) with a multiplier ``y_i >= 0``; the dense rows have free multipliers. For given
multipliers the box problem separates: ``v(y) = clip(u + R^T y, lo, hi)``, and the dual
``D(y) = min_box |v - u|^2 / 2 - y^T (R v - r)`` is concave and piecewise quadratic with gradient
``r - R v(y)``. It is maximised by a projected Newton method (Bertsekas): multipliers at 0 whose
gradient points out stay there, the others take the Newton step ``(R_F R_F^T) d = r - R v`` over
the free entries ``F`` (the separable solver's step, for several rows), projected on ``y >= 0``
with a backtracking line search on ``D``. Once the active sets settle the step solves the linear
system of those sets: the iteration ends on the exact solution. The wall rows are stored over
the columns near the walls only (``t`` of them): a step costs ``O(M n + k^2 t + k^3)`` per sample
for ``M`` dense rows and ``k`` rows that move (the batch's systems padded to its largest ``k``
and solved in one batched call), where the dense general solver
(:func:`~constraint_layers._bounded.project_bounded`) costs ``O(n^2)`` per active bound.

The solution is re-derived, with autograd, from the final active sets: the equality-only
projection onto the rows and the held wall values over the free entries (the implicit function
theorem on the active set).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._tolerance import FACES_PIVOT_RTOL, FACES_RIDGE, FACES_ROUNDING
from ...errors import ConstraintError
from .checks import EPS, F64

__all__ = ["project_faces_bounded"]

#: Newton steps of the dual iteration.
MAX_NEWTON = 200
#: Armijo fraction of the line search on the dual.
ARMIJO = 1e-4


def _clip(w: Tensor, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    return torch.clamp(w, lo, hi) if (lo is not None or hi is not None) else w


def _free(w: Tensor, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    free = torch.ones_like(w, dtype=torch.bool)
    if lo is not None:
        free &= w > lo
    if hi is not None:
        free &= w < hi
    return free


class _Stack:
    """The rows ``[E; W]`` of a batch: ``E`` (B, M, n) dense, ``W`` (K, t) dense over the ``t``
    columns ``T`` that any wall row reads (the values near the walls), shared by the batch:
    products cost ``O(B (M n + K t))``."""

    def __init__(self, E: Tensor, W: Tensor, T: Tensor, n: int) -> None:
        self.E, self.W, self.T, self.n = E, W, T, n
        self.M = E.shape[-2]
        self._pairs: tuple[Tensor, Tensor, Tensor] | None = None

    def pairs(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, l, c)``: every pair of wall rows that read the same column ``c`` (each wall row
        reads a few values: a few pairs per column)."""
        if self._pairs is None:
            rows, cols = (self.W != 0).nonzero(as_tuple=True)  # sorted by row
            order = torch.argsort(cols, stable=True)
            rows, cols = rows[order], cols[order]
            t = self.W.shape[1]
            count = torch.bincount(cols, minlength=t)
            width = int(count.max()) if count.numel() else 0
            start = torch.cumsum(count, 0) - count
            slot = torch.arange(rows.numel()) - start[cols]
            table = torch.full((t, max(width, 1)), -1, dtype=torch.long)
            table[cols, slot] = rows
            a = table[:, :, None].expand(t, table.shape[1], table.shape[1])
            b = table[:, None, :].expand_as(a)
            c = torch.arange(t)[:, None, None].expand_as(a)
            ok = (a >= 0) & (b >= 0)
            self._pairs = (a[ok], b[ok], c[ok])
        return self._pairs

    @property
    def k(self) -> int:
        return self.M + self.W.shape[0]

    def rt(self, y: Tensor) -> Tensor:
        """``R^T y``: (B, n) for ``y`` (B, k)."""
        B = y.shape[0]
        if self.M:
            out = (y[:, None, : self.M] @ self.E).squeeze(-2)
        else:
            out = y.new_zeros((B, self.n))
        if not self.W.shape[0]:
            return out
        return out.index_add(1, self.T, y[:, self.M :] @ self.W)

    def r(self, x: Tensor) -> Tensor:
        """``R x``: (B, k) for ``x`` (B, n)."""
        return torch.cat([(self.E @ x.unsqueeze(-1)).squeeze(-1), x[:, self.T] @ self.W.mT], -1)

    def norms(self) -> Tensor:
        """The rows' squared norms: (B, k)."""
        B = self.E.shape[0]
        return torch.cat([self.E.square().sum(-1), self.W.square().sum(-1).expand(B, -1)], -1)

    def gram_kept(self, free: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``R_KF R_KF^T`` over the entries ``free`` (B, n) bool and, per sample, the rows
        ``keep`` (B, k) only: ``(J, sel, valid)``, ``J`` (B, k', k') over the rows ``sel``
        (B, k') (the dense rows first, then the kept wall rows, padded to the most any sample
        keeps); ``valid`` (B, k') marks the kept ones. Each wall row reads a few values near
        the walls: ``O(M n + M k' t + pairs)`` per sample, never ``O(k^2)``."""
        B, M = free.shape[0], self.M
        selW, validW = _compact(keep[:, M:])
        sel = torch.cat([torch.arange(M).expand(B, M), M + selW], -1)
        valid = torch.cat([keep[:, :M], validW], -1)
        EF = self.E * free.unsqueeze(-2)
        Ws = self.W[selW]  # (B, k'w, t)
        Ws = torch.where(validW.unsqueeze(-1), Ws, torch.zeros((), dtype=Ws.dtype))
        EE = EF @ self.E.mT
        EW = EF[..., self.T] @ Ws.mT
        # the kept wall rows' Gram over the pairs of rows that share a column (each wall row
        # reads a few values): O(pairs) per sample, not O(k'^2 t)
        kw, K = selW.shape[1], self.W.shape[0]
        pos = torch.full((B, K), -1, dtype=torch.long)
        pos = pos.scatter(1, selW, torch.where(validW, torch.arange(kw).expand(B, kw), -1))
        a, b, c = self.pairs()
        pa, pb = pos[:, a], pos[:, b]  # (B, pairs)
        both = (pa >= 0) & (pb >= 0)
        prod = (self.W[a, c] * self.W[b, c]) * (free[:, self.T[c]] & both)
        index = torch.where(both, pa * kw + pb, 0)
        WW = self.W.new_zeros((B, kw * kw))
        if kw:
            WW = WW.scatter_add(1, index, prod)
        WW = WW.reshape(B, kw, kw)
        J = torch.cat([torch.cat([EE, EW], -1), torch.cat([EW.mT, WW], -1)], -2)
        both = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        J = torch.where(both, J, torch.zeros((), dtype=J.dtype))
        return J + torch.diag_embed((~valid).to(J.dtype)), sel, valid


def _compact(keep: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample, the positions of the rows ``keep`` (B, k) first: ``(sel, valid)``, both
    (B, k'), ``k'`` the most rows kept by any sample (``valid``: a kept row, else padding)."""
    width = int(keep.sum(-1).amax()) if keep.numel() else 0
    sel = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    return sel, keep.gather(1, sel)


def _solve_kept(R: _Stack, free: Tensor, rhs: Tensor, keep: Tensor, ridge: Tensor) -> Tensor:
    """Per sample, ``x`` (B, k) with ``x_K = (R_KF R_KF^T + diag(ridge_K))^{-1} rhs_K`` over the
    rows ``K = keep`` and 0 elsewhere: the batch's systems over their own row sets, padded with
    identity rows, in one batched solve (the pseudo-inverse for a singular one)."""
    J, sel, valid = R.gram_kept(free, keep)
    if not sel.shape[1]:
        return torch.zeros_like(rhs)
    J = J + torch.diag_embed(torch.where(valid, ridge.gather(1, sel), 0.0))
    rc = torch.where(valid, rhs.gather(1, sel), 0.0).unsqueeze(-1)
    xc, info = torch.linalg.solve_ex(J, rc)
    if bool((info != 0).any()):
        fail = info != 0
        xc[fail] = torch.linalg.pinv(J[fail], hermitian=True) @ rc[fail]
    return torch.zeros_like(rhs).scatter(1, sel, torch.where(valid, xc.squeeze(-1), 0.0))


def _solve_dual(u, R: _Stack, r, enabled, lo, hi, tol, call) -> Tensor:
    """The multipliers ``y`` (B, k) (float64, no autograd): ``y[:, M:] >= 0``, zero where a row
    is not ``enabled`` (an infinite wall bound); see the module docstring. The batch's samples
    iterate together, each with its own active sets and line search."""
    B, k = u.shape[0], R.k
    y = torch.zeros((B, k), dtype=F64)
    if k == 0:
        return y
    ineq = (torch.arange(k) >= R.M).expand(B, k)
    norms = R.norms()

    def at(y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = u + R.rt(y)
        x = _clip(w, lo, hi)
        g = torch.where(enabled, r - R.r(x), 0.0)  # the dual's gradient
        return w, x, g, 0.5 * (x - u).square().sum(-1) + (y * g).sum(-1)

    w, _, g, dual = at(y)
    for _ in range(MAX_NEWTON):
        # optimal: the rows hold, the inequalities hold, and a held one (y > 0) holds with
        # equality
        bad = torch.where(ineq, torch.where(y > 0, g.abs(), g.clamp_min(0)), g.abs())
        worst = bad.amax(-1)
        done = worst <= tol
        if bool(done.all()):
            return y
        # multipliers at 0 whose gradient points out stay at 0; converged samples stay
        move = enabled & ~(ineq & (y <= 0) & (g <= 0)) & ~done.unsqueeze(-1)
        # a ridge relative to each row's full norm: a row whose entries all sit at a bound
        # gets a long step (cut back by the line search) instead of none
        d = _solve_kept(R, _free(w, lo, hi), g, move, FACES_RIDGE * norms + 1e-300)
        t = torch.ones(B, dtype=F64)
        accepted = done.clone()
        yn, wn, gn, dn = y, w, g, dual
        while True:
            yt = y + t.unsqueeze(-1) * d
            yt = torch.where(ineq, yt.clamp_min(0), yt)
            wt, _, gt, dt = at(yt)
            ok = dt >= dual + ARMIJO * (g * (yt - y)).sum(-1) - 1e-15 * dual.abs()
            take = ok & ~accepted
            if bool(take.any()):
                col = take.unsqueeze(-1)
                yn, wn, gn = (
                    torch.where(col, yt, yn),
                    torch.where(col, wt, wn),
                    torch.where(col, gt, gn),
                )
                dn = torch.where(take, dt, dn)
                accepted = accepted | take
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
            stuck = ~accepted & (t < 1e-14)
            if bool(stuck.any()):
                raise _no_progress(call, float(worst[stuck].amax()))
        y, w, g, dual = yn, wn, gn, dn
    raise _no_progress(call, float(worst.amax()))


def _no_progress(call: str, residual: float) -> ConstraintError:
    return ConstraintError(
        f"{call}: no value within the bounds satisfies the rows together with the boundary "
        f"conditions and the bounds on the wall values (the dual iteration made no progress; "
        f"residual {residual:.3e}). Check the totals, the bounds and the wall values."
    )


def project_faces_bounded(
    u: Tensor,
    E: Tensor,
    e: Tensor,
    W: Tensor,
    T: Tensor,
    wl: Tensor,
    wh: Tensor,
    lo: Tensor | None,
    hi: Tensor | None,
    call: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Solve the problem of the module docstring for a batch of samples, together.

    Parameters
    ----------
    u : Tensor
        shape: (B, n).
    E, e : Tensor
        shape: (B, M, n) float64 and (B, M): the dense rows.
    W, T : Tensor
        shape: (K, t) float64 and (t,) long: the wall rows, as functions of ``v``, over the
        columns ``T`` they read (shared by the batch).
    wl, wh : Tensor
        shape: (B, K): the wall rows' bounds (``-inf`` / ``+inf`` where none).
    lo, hi : Tensor, optional
        shape: (B, n): the box (``-inf`` / ``+inf`` allowed).

    Returns
    -------
    tuple of Tensor
        ``v`` (B, n) float64, differentiable; the wall rows (B, K) held at their lower bound,
        and at their upper bound.
    """
    B, n = u.shape
    M, K = E.shape[-2], W.shape[0]
    # lower rows W v >= wl, upper rows -W v >= -wh; a row infinite in every sample left out
    side = torch.cat([torch.isfinite(wl.detach()).any(0), torch.isfinite(wh.detach()).any(0)])
    rows2 = side.nonzero().flatten()  # positions in [lower rows; upper rows]
    sign = torch.where(rows2 < K, 1.0, -1.0).to(F64).unsqueeze(-1)
    W2 = sign * W.to(F64)[rows2 % K]
    bounds2 = torch.cat([wl.to(F64), -wh.to(F64)], -1)[:, rows2]  # (B, K2)
    with torch.no_grad():
        u64 = u.detach().to(F64)
        lo64 = None if lo is None else lo.detach().to(F64)
        hi64 = None if hi is None else hi.detach().to(F64)
        r_w = bounds2.detach()
        enabled = torch.cat([torch.ones((B, M), dtype=torch.bool), torch.isfinite(r_w)], -1)
        r = torch.where(enabled, torch.cat([e.detach().to(F64), r_w], -1), 0.0)
        R = _Stack(E.detach().to(F64), W2.detach().to(F64), T, n)
        scale = u64.abs().amax(-1) if n else torch.zeros(B, dtype=F64)
        for t in (r, lo64, hi64):
            if t is not None and t.shape[-1]:
                scale = torch.maximum(scale, torch.where(torch.isfinite(t), t.abs(), 0).amax(-1))
        tol = FACES_ROUNDING * EPS * scale.clamp_min(1e-300)
        y = _solve_dual(u64, R, r, enabled, lo64, hi64, tol, call)
        w = u64 + R.rt(y) if R.k else u64
        at_lo = torch.zeros((B, n), dtype=torch.bool) if lo64 is None else w <= lo64
        at_hi = torch.zeros((B, n), dtype=torch.bool) if hi64 is None else w >= hi64
        held = torch.cat([torch.ones((B, M), dtype=torch.bool), y[:, M:] > 0], -1)
        at_w = torch.zeros((B, 2 * K), dtype=torch.bool)
        at_w[:, rows2] = y[:, M:] > 0
        at_wl, at_wh = at_w[:, :K], at_w[:, K:]
    # the solution on the active sets, with autograd: the rows and the held wall values over
    # the free entries, the box-active entries at their bound
    dev = u.device
    Rg = _Stack(E.to(F64), W2, T, n)
    Rg._pairs = R._pairs  # the same wall rows
    rg = torch.cat([e.to(F64), bounds2], -1)
    fixed = at_lo | at_hi
    xa = torch.zeros((B, n), dtype=F64, device=dev)
    if lo is not None:
        xa = torch.where(at_lo, lo.to(F64), xa)
    if hi is not None:
        xa = torch.where(at_hi, hi.to(F64), xa)
    base = torch.where(fixed, xa, u.to(F64))
    if not Rg.k:
        return base, at_wl, at_wh
    # rows with no free entry left hold already (the dual solve converged): left out
    free = ~fixed
    reach = (
        torch.cat(
            [
                (Rg.E.detach().abs() * free.unsqueeze(-2)).sum(-1),
                free[:, T].to(F64) @ Rg.W.detach().abs().mT,
            ],
            -1,
        )
        > 0
    )
    act = held & reach
    if not bool(act.any()):
        return base, at_wl, at_wh
    # the held rows over the free entries, per sample, compacted (identity rows pad the batch)
    A, sel, valid = Rg.gram_kept(free, act)
    rhs = torch.where(valid, (torch.where(act, rg, 0.0) - Rg.r(base)).gather(1, sel), 0.0)
    Ad = A.detach()
    L, info = torch.linalg.cholesky_ex(Ad)
    pivots = L.diagonal(dim1=-2, dim2=-1).square() / Ad.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300)
    if bool((info == 0).all()) and bool((pivots > FACES_PIVOT_RTOL).all()):
        coef = torch.cholesky_solve(rhs.unsqueeze(-1), torch.linalg.cholesky(A)).squeeze(-1)
    else:  # dependent rows over the free entries (consistent: the dual solve converged)
        coef = (torch.linalg.pinv(A, hermitian=True) @ rhs.unsqueeze(-1)).squeeze(-1)
    coef = torch.zeros((B, Rg.k), dtype=F64, device=dev).scatter(
        1, sel, torch.where(valid, coef, 0.0)
    )
    return base + torch.where(fixed, 0.0, Rg.rt(coef)), at_wl, at_wh
