"""The bounded Euclidean projection with the boundary step eliminated (private).

With boundary rows on a deterministic output the step ``B(v) = S v + f`` keeps its meaning (the
face-local rows are eliminated: the values the step sets are affine in the others), and what is
left is, per sample::

    minimise   |v - u|^2
    subject to E v = e                 (the few dense rows on the freedom left: G' = G S)
               lo <= v <= hi           (the bounds on the values the step leaves unchanged)
               l <= W v <= h           (the bounds on the values the step sets: W = S's rows there)

Method (exact; finite once the active sets settle): the dual. Every wall bound is an inequality
row ``R_i v >= r_i`` (``W_m`` with ``l_m``, ``-W_m`` with ``-h_m``; infinite ones dropped) with a
multiplier ``y_i >= 0``; the dense rows have free multipliers. For given multipliers the box
problem separates: ``v(y) = clip(u + R^T y, lo, hi)``, and the dual
``D(y) = min_box |v - u|^2 / 2 - y^T (R v - r)`` is concave and piecewise quadratic with gradient
``r - R v(y)``. It is maximised by a projected Newton method (Bertsekas): multipliers at 0 whose
gradient points out stay there, the others take the Newton step ``(R_F R_F^T) d = r - R v`` over
the free entries ``F`` (the separable solver's step, for several rows), projected on ``y >= 0``
with a backtracking line search on ``D``. Once the active sets settle the step solves the linear
system of those sets: the iteration ends on the exact solution. The wall rows are stored over
the columns near the walls only (``t`` of them): a step costs ``O(M n + k^2 t + k^3)`` for ``M``
dense rows and ``k`` rows that move, where the dense general solver
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
    """The rows ``[E; W]``: ``E`` (M, n) dense, ``W`` (K, t) dense over the ``t`` columns ``T``
    that any wall row reads (the values near the walls): products cost ``O(M n + K t)``."""

    def __init__(self, E: Tensor, W: Tensor, T: Tensor, n: int) -> None:
        self.E, self.W, self.T, self.n = E, W, T, n
        self.M = E.shape[0]
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
        """``R^T y``: (n,)."""
        out = y[: self.M] @ self.E if self.M else self.E.new_zeros(self.n)
        return out.index_add(0, self.T, y[self.M :] @ self.W) if self.W.shape[0] else out

    def r(self, x: Tensor) -> Tensor:
        """``R x``: (k,)."""
        return torch.cat([self.E @ x, self.W @ x[self.T]])

    def norms(self) -> Tensor:
        return torch.cat([self.E.square().sum(-1), self.W.square().sum(-1)])

    def select(self, rows: Tensor) -> _Stack:
        return _Stack(self.E[rows[: self.M]], self.W[rows[self.M :]], self.T, self.n)

    def gram(self, free: Tensor) -> Tensor:
        """``R_F R_F^T`` over the entries ``free`` (n,) bool: (k, k)."""
        EF = self.E * free
        EE = EF @ self.E.mT
        EW = EF[:, self.T] @ self.W.mT
        # each wall row reads a few values: summed over the pairs that share a column, O(pairs)
        # rather than O(K^2 t)
        K = self.W.shape[0]
        a, b, c = self.pairs()
        prod = self.W[a, c] * self.W[b, c] * free[self.T[c]]
        WW = self.W.new_zeros((K, K)).index_put((a, b), prod, accumulate=True)
        return torch.cat([torch.cat([EE, EW], 1), torch.cat([EW.mT, WW], 1)])


def _solve_dual(u, R: _Stack, r, lo, hi, tol, call) -> Tensor:
    """The multipliers ``y`` (float64, no autograd): ``y[M:] >= 0`` (see the module
    docstring)."""
    k = R.k
    y = torch.zeros(k, dtype=F64)
    if k == 0:
        return y
    ineq = torch.arange(k) >= R.M
    norms = R.norms()

    def at(y: Tensor) -> tuple[Tensor, Tensor, Tensor, float]:
        w = u + R.rt(y)
        x = _clip(w, lo, hi)
        g = r - R.r(x)  # the dual's gradient
        return w, x, g, 0.5 * float((x - u).square().sum()) + float(y @ g)

    w, _, g, dual = at(y)
    for _ in range(MAX_NEWTON):
        # optimal: the rows hold, the inequalities hold, and a held one (y > 0) holds with
        # equality
        bad = torch.where(ineq, torch.where(y > 0, g.abs(), g.clamp_min(0)), g.abs())
        if float(bad.max()) <= tol:
            return y
        # multipliers at 0 whose gradient points out stay at 0
        move = ~(ineq & (y <= 0) & (g <= 0))
        J = R.gram(_free(w, lo, hi))[move][:, move]
        # a ridge relative to each row's full norm: a row whose entries all sit at a bound
        # gets a long step (cut back by the line search) instead of none
        ridge = FACES_RIDGE * norms[move] + 1e-300
        d = torch.zeros(k, dtype=F64)
        Jr = J + torch.diag(ridge)
        step, info = torch.linalg.solve_ex(Jr, g[move])
        d[move] = step if int(info) == 0 else torch.linalg.pinv(Jr, hermitian=True) @ g[move]
        t = 1.0
        while True:
            yn = y + t * d
            yn = torch.where(ineq, yn.clamp_min(0), yn)
            wn, _, gn, dn = at(yn)
            if dn >= dual + ARMIJO * float(g @ (yn - y)) - 1e-15 * abs(dual):
                break
            t *= 0.5
            if t < 1e-14:
                raise _no_progress(call, float(bad.max()))
        y, w, g, dual = yn, wn, gn, dn
    raise _no_progress(call, float(bad.max()))


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
    """Solve the problem of the module docstring for one sample.

    Parameters
    ----------
    u : Tensor
        shape: (n,).
    E, e : Tensor
        shape: (M, n) float64 and (M,): the dense rows.
    W, T : Tensor
        shape: (K, t) float64 and (t,) long: the wall rows, as functions of ``v``, over the
        columns ``T`` they read.
    wl, wh : Tensor
        shape: (K,): the wall rows' bounds (``-inf`` / ``+inf`` where none).
    lo, hi : Tensor, optional
        shape: (n,): the box (``-inf`` / ``+inf`` allowed).

    Returns
    -------
    tuple of Tensor
        ``v`` (n,) float64, differentiable; the wall rows (K,) held at their lower bound, and
        at their upper bound.
    """
    n = u.shape[0]
    M = E.shape[0]
    with torch.no_grad():
        u64 = u.detach().to(F64)
        lo64 = None if lo is None else lo.detach().to(F64)
        hi64 = None if hi is None else hi.detach().to(F64)
        W64, wl64, wh64 = W.detach().to(F64), wl.detach().to(F64), wh.detach().to(F64)
        has_lo, has_hi = torch.isfinite(wl64), torch.isfinite(wh64)
        R = _Stack(E.detach().to(F64), torch.cat([W64[has_lo], -W64[has_hi]]), T, n)
        r = torch.cat([e.detach().to(F64), wl64[has_lo], -wh64[has_hi]])
        finite = [t[torch.isfinite(t)] for t in (r, lo64, hi64) if t is not None]
        scale = float(u64.abs().max()) if n else 0.0
        scale = max([scale, 1e-300] + [float(t.abs().max()) for t in finite if t.numel()])
        y = _solve_dual(u64, R, r, lo64, hi64, FACES_ROUNDING * EPS * scale, call)
        w = u64 + R.rt(y) if R.k else u64
        at_lo = torch.zeros(n, dtype=torch.bool) if lo64 is None else w <= lo64
        at_hi = torch.zeros(n, dtype=torch.bool) if hi64 is None else w >= hi64
        held = torch.cat([torch.ones(M, dtype=torch.bool), y[M:] > 0])
        K = W.shape[0]
        at_wl = torch.zeros(K, dtype=torch.bool)
        at_wh = torch.zeros(K, dtype=torch.bool)
        nl = int(has_lo.sum())
        at_wl[has_lo] = y[M : M + nl] > 0
        at_wh[has_hi] = y[M + nl :] > 0
    # the solution on the active sets, with autograd: the rows and the held wall values over
    # the free entries, the box-active entries at their bound
    dev = u.device
    Wg = torch.cat([W.to(F64)[has_lo], -W.to(F64)[has_hi]])
    Rg = _Stack(E.to(F64), Wg, T, n).select(held)
    rg = torch.cat([e.to(F64), wl.to(F64)[has_lo], -wh.to(F64)[has_hi]])[held]
    fixed = at_lo | at_hi
    xa = torch.zeros(n, dtype=F64, device=dev)
    if lo is not None:
        xa = torch.where(at_lo, lo.to(F64), xa)
    if hi is not None:
        xa = torch.where(at_hi, hi.to(F64), xa)
    base = torch.where(fixed, xa, u.to(F64))
    # rows with no free entry left hold already (the dual solve converged): left out
    reach = torch.cat([(Rg.E * ~fixed).abs().sum(-1), (Rg.W * ~fixed[T]).abs().sum(-1)]) > 0
    Rg, rg = Rg.select(reach.detach()), rg[reach.detach()]
    if not Rg.k:
        return base, at_wl, at_wh
    A = Rg.gram(~fixed)
    rhs = rg - Rg.r(base)
    L, info = torch.linalg.cholesky_ex(A.detach())
    pivots = L.diagonal().square() / A.detach().diagonal().clamp_min(1e-300)
    if int(info) == 0 and bool((pivots > FACES_PIVOT_RTOL).all()):
        coef = torch.cholesky_solve(rhs.unsqueeze(-1), torch.linalg.cholesky(A)).squeeze(-1)
    else:  # dependent rows over the free entries (consistent: the dual solve converged)
        coef = torch.linalg.pinv(A, hermitian=True) @ rhs
    return base + torch.where(fixed, 0.0, Rg.rt(coef)), at_wl, at_wh
