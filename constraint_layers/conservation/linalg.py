"""The constraint algebra of the conditioning: ``A = G W G^T`` and its (pseudo-)inverse root, the
polish step that keeps ``G mean = b`` exact, the near-dependence warning (private)."""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .._state import building_constants
from .._tolerance import RANK_FACTOR, rank_cutoff
from ..errors import ConditioningWarning, SingularConstraintError
from .gaussian import (
    F64,
)

__all__ = []

#: A squared Cholesky pivot below this fraction of its diagonal entry means dependent rows (the
#: rows' own geometry; the rank of ``G Sigma G^T`` is judged by ``_tolerance.rank_cutoff``).
PIVOT_RTOL = 1e-12
#: Below this pivot ratio the update is followed by an exactness correction (the polish step).
POLISH_RTOL = 1e-6
#: Further polish steps (iterative refinement) while ``G mean = b`` still misses rounding.
REFINE_STEPS = 2


#: A matrix of rows is handled as sparse when at most this fraction of its entries is non-zero.
SPARSE_FRACTION = 0.25
#: Matrices of rows remembered by :func:`sparse_rows` (most recent first) and the largest kept.
_CACHE_SIZE, _CACHE_NUMEL = 4, 1 << 20
_cache: list[tuple[Tensor, _SparseRows]] = []
_cache_lock = threading.Lock()


class _SparseRows:
    """A fixed matrix of rows ``G`` (M, N) in compressed sparse row form, with what the
    conditioning derives from ``G`` alone (its normalised Gram eigen-decomposition), computed
    once per distinct ``G`` (see :func:`sparse_rows`)."""

    def __init__(self, G: Tensor) -> None:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self.csr = G.to_sparse_csr()
        self._geometry: tuple[Tensor, Tensor, Tensor] | None = None

    def mm(self, X: Tensor) -> Tensor:
        """``G @ X`` for X (N, K) in G's dtype: (M, K)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse.mm(self.csr, X)

    def geometry(self) -> tuple[Tensor, Tensor, Tensor]:
        """Row norms (M,), and the eigenvalues (M,) and vectors (M, M) of the normalised Gram
        matrix ``Gn Gn^T`` (float64)."""
        if self._geometry is None:
            with building_constants():  # kept: plain tensors in any autograd context
                self._geometry = _gram_geometry(self.csr.to_dense().to(F64))
        return self._geometry


def sparse_rows(G: Tensor) -> _SparseRows | None:
    """``G`` (M, N) as :class:`_SparseRows` when it is a plain 2-D matrix, mostly zeros and free of
    autograd; None otherwise (use dense products).

    The conditioning is called again and again with the same rows (a wrapper, every forward
    pass), each time as a freshly built dense tensor; the sparse form and the row geometry are
    kept for the few most recent distinct matrices, found again by exact equality (one pass
    over ``G``, far cheaper than the conversion).
    """
    if G.ndim != 2 or G.layout != torch.strided or G.requires_grad or G.is_complex():
        return None
    if G.numel() < 4096:
        return None  # small: dense products are as fast
    with _cache_lock:
        for i, (key, value) in enumerate(_cache):
            if (
                key.shape == G.shape and key.dtype == G.dtype and key.device == G.device
                and torch.equal(key, G)
            ):  # fmt: skip
                if i:
                    _cache.insert(0, _cache.pop(i))
                return value
    if int(torch.count_nonzero(G)) > SPARSE_FRACTION * G.numel():
        return None
    with building_constants():  # kept across calls: plain tensors in any autograd context
        value = _SparseRows(G)
        key = G.detach().clone()
    if G.numel() <= _CACHE_NUMEL:
        with _cache_lock:
            _cache.insert(0, (key, value))
            del _cache[_CACHE_SIZE:]
    return value


def _gram(G: Tensor, P: Tensor, sparse: _SparseRows | None) -> Tensor:
    """``G @ P`` for P (*, N, M), with the sparse form of G when there is one."""
    if sparse is not None and P.ndim == 2 and P.dtype == sparse.csr.dtype:
        return sparse.mm(P)
    return G @ P


def _rowdot(G: Tensor, x: Tensor) -> Tensor:
    """``G x`` for G (*gb, M, N) and x (*xb, N): (*batch, M)."""
    if G.ndim == 2:
        return x @ G.mT
    return (G @ x.unsqueeze(-1)).squeeze(-1)


def _check_rows(
    A: Tensor,
    nonzero: Callable[[], Tensor],
    call: str,
    allow_tiny: bool = False,
    floor: Tensor | None = None,
) -> Tensor:
    """Zero or negative diagonal entries of ``A``: a SingularConstraintError that says what to do.

    ``nonzero()`` (shape (*gb, M), bool): whether each row of G has a non-zero entry (evaluated
    only to word the error). ``allow_tiny``: let entries that are zero to rounding (within
    ``floor``, either sign, not exactly zero) through to the pseudo-inverse. ``floor`` (shape
    (*, 1)): the rounding of ``A`` (default ``PIVOT_RTOL`` of its largest diagonal entry).
    Returns the diagonal of ``A`` (detached).
    """
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    if floor is None:
        floor = PIVOT_RTOL * diag.abs().amax(-1, keepdim=True)
    bad = ~(diag > 0)
    if allow_tiny and bool(bad.any()):
        bad = bad & ((diag == 0) | (diag < -floor))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        row, where = idx[-1], (f" (batch index {tuple(idx[:-1])})" if len(idx) > 1 else "")
        if bool(diag[tuple(idx)] < -floor.expand_as(diag)[tuple(idx)]):
            raise ValueError(
                f"{call}: the covariance is not positive semidefinite: g Sigma g^T = "
                f"{float(diag[tuple(idx)]):.3e} < 0 for constraint row {row}{where}. Pass a valid "
                "covariance (symmetric positive semidefinite)."
            )
        if not bool(nonzero().expand(diag.shape)[tuple(idx)]):
            why = f"row {row} of G is all zeros{where}: it constrains nothing"
            fix = "remove the row (or its constraint)"
        else:
            why = (
                f"constraint row {row}{where} sees zero variance everywhere (G Sigma G^T has a "
                "zero diagonal entry), so no output value may move to satisfy it"
            )
            fix = 'add constraint noise (noise > 0) or use metric="euclidean"'
        raise SingularConstraintError(f"{call}: {why}; {fix}.")
    return diag


def _dependent(call: str, where: str = "") -> SingularConstraintError:
    return SingularConstraintError(
        f"{call}: the constraint rows are linearly dependent{where} (duplicate or redundant "
        "constraints, also counting only the points whose variance is non-zero): no update can "
        "satisfy them all. Remove the redundant rows, or add constraint noise (noise > 0)."
    )


class _Root(NamedTuple):
    """``A^+ = R R^T`` (R: (*, M, K)); ``polish``: finish with an exactness correction;
    ``condition``: the condition number of the part of ``A`` that was inverted (detached)."""

    R: Tensor
    polish: bool
    condition: float = 1.0


def _cutoff(A: Tensor, source: torch.dtype, n: int) -> Tensor:
    """The rank cutoff of ``A = G W G^T`` (*, M, M), float64 sums of ``n`` terms of a matrix
    ``W`` known to the rounding of ``source``: shape (*, 1)."""
    scale = A.detach().diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True)
    return rank_cutoff(source, scale, A.shape[-1]) + rank_cutoff(F64, scale, n)


def _inverse_root(
    A: Tensor,
    nonzero: Callable[[], Tensor],
    metric: str,
    call: str,
    cut: Tensor | None = None,
) -> _Root:
    """A root of the (pseudo-)inverse of ``A = G W G^T + noise^2 I`` (float64).

    Well-conditioned ``A``: ``R = L^{-T}`` from its Cholesky factor. When the covariance leaves
    (numerically) no freedom along some combination of the rows (a smooth GP's masses at many
    times, a low-rank ensemble with fewer members than rows), those directions are dropped
    (eigenvalues at or below ``cut``, shape (*, 1), default ``PIVOT_RTOL`` of the largest
    diagonal entry) and the result is marked for the polish step, which enforces them with the
    marginal variances. The root of the pseudo-inverse is then its symmetric square root
    ``(A^+)^{1/2}``, a spectral function of ``A`` whose backward pass is finite also for
    repeated eigenvalues (identical blocks of rows): see :class:`_PinvSqrt`.
    """
    m = A.shape[-1]
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    if cut is None:
        cut = PIVOT_RTOL * diag.abs().amax(-1, keepdim=True)
    diag = _check_rows(A, nonzero, call, allow_tiny=m > 1 and metric == "covariance", floor=cut)
    if m == 1:  # one row: a square root
        return _Root(A.rsqrt(), False)
    L, info = torch.linalg.cholesky_ex(A)
    piv = L.detach().diagonal(dim1=-2, dim2=-1).square()
    ratio = piv / diag.abs()
    # a row whose variance is rounding next to the others' (g in the null space of Sigma, seen
    # through cancellation as +-1e-17) is not a pivot to invert, whatever its own ratio
    visible = diag.abs() > cut
    healthy = (ratio > PIVOT_RTOL) & (piv > cut)
    if not bool((info != 0).any()) and bool(healthy.all()) and bool(visible.all()):
        eye = torch.eye(m, dtype=A.dtype, device=A.device).expand_as(A)
        R = torch.linalg.solve_triangular(L, eye, upper=False).mT
        cond = float((diag.amax(-1) / piv.amin(-1)).amax())
        return _Root(R, bool((ratio < POLISH_RTOL).any()), cond)
    if metric == "euclidean":  # W = I: ill-conditioned only if the rows are dependent
        raise _dependent(call)
    R, cond = _pinv_sqrt(A, cut)
    return _Root(R, True, cond)


def _pinv_sqrt(A: Tensor, cut: Tensor) -> tuple[Tensor, float]:
    """``(A^+)^{1/2}`` over the eigenvalues above ``cut`` (*, 1), and the condition number of
    the kept part."""
    R = _PinvSqrt.apply(0.5 * (A + A.mT), cut.to(A.dtype))
    lam = torch.linalg.eigvalsh(A.detach())
    kept = torch.where(lam > cut, lam, torch.full_like(lam, math.inf)).amin(-1)
    cond = float((lam.amax(-1) / kept).amax()) if bool(torch.isfinite(kept).all()) else 1.0
    return R, max(cond, 1.0)


class _Spectral(torch.autograd.Function):
    """``R = V h(Lambda) V^T`` with ``h(l) = l^{-1/2}`` above the cutoff, 0 at or below it, and
    the log pseudo-determinant ``sum log l`` over the same eigenvalues (and which are kept).

    ``R R^T = A^+`` (the pseudo-inverse over the kept eigenvalues), and ``R`` is a spectral
    function of the symmetric ``A``: unique whatever basis ``eigh`` picks inside a repeated
    eigenvalue. Its derivative (Daleckii-Krein) is
    ``dR = V (Gamma o (V^T dA V)) V^T`` with ``Gamma_ij`` the divided difference
    ``(h_i - h_j) / (l_i - l_j)``, ``h'(l_i)`` where ``l_i = l_j``, written without cancellation
    (``-1 / (s_i s_j (s_i + s_j))``, ``s = sqrt(l)``, for two kept eigenvalues); that of the log
    pseudo-determinant is ``A^+``. Both are finite for exactly repeated eigenvalues, where the
    backward of ``eigh`` itself is NaN. The cutoff is ``cut`` (shape (*, 1)), or ``rcond`` times
    the largest eigenvalue when ``cut`` is None (returned too, shape (*, 1)).
    """

    @staticmethod
    def forward(ctx, A: Tensor, cut: Tensor | None, rcond: float = 0.0):
        lam, V = torch.linalg.eigh(A)
        if cut is None:
            cut = rcond * lam.abs().amax(-1, keepdim=True)
        keep = lam > cut
        s = torch.where(keep, lam, torch.ones_like(lam)).sqrt()
        h = torch.where(keep, 1.0 / s, torch.zeros_like(lam))
        ctx.save_for_backward(lam, V, s, h, keep)
        cut = cut.expand(*lam.shape[:-1], 1).clone()
        ctx.mark_non_differentiable(keep, cut)
        log_pdet = torch.where(keep, 2 * s.log(), torch.zeros_like(lam)).sum(-1)
        return (V * h.unsqueeze(-2)) @ V.mT, log_pdet, keep, cut

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gR: Tensor, glog: Tensor, _gkeep: Tensor | None, _gcut: Tensor | None):
        lam, V, s, h, keep = ctx.saved_tensors
        ki, kj = keep.unsqueeze(-1), keep.unsqueeze(-2)
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        both = -1.0 / (si * sj * (si + sj))
        gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)
        # one kept, one dropped: the kept eigenvalue lies strictly above the dropped one
        safe = torch.where(ki ^ kj, gap, torch.ones_like(gap))
        mixed = (h.unsqueeze(-1) - h.unsqueeze(-2)) / safe
        gamma = torch.where(ki & kj, both, torch.where(ki ^ kj, mixed, torch.zeros_like(gap)))
        g = V.mT @ (0.5 * (gR + gR.mT)) @ V
        inner = gamma * g + torch.diag_embed(glog.unsqueeze(-1) * h.square())
        return V @ inner @ V.mT, None, None


class _SqrtKept(torch.autograd.Function):
    """``V sqrt(Lambda) V^T`` over the eigenvalues above ``cut`` (*, 1): the symmetric root of
    the kept part of a PSD matrix, a spectral function with the Daleckii-Krein backward
    (``Gamma_ij = 1 / (s_i + s_j)`` for two kept eigenvalues, finite when they are equal)."""

    @staticmethod
    def forward(ctx, A: Tensor, cut: Tensor | None, rcond: float = 0.0) -> Tensor:
        lam, V = torch.linalg.eigh(A)
        if cut is None:
            cut = rcond * lam.abs().amax(-1, keepdim=True)
        keep = lam > cut
        s = torch.where(keep, lam, torch.zeros_like(lam)).sqrt()
        ctx.save_for_backward(lam, V, s, keep)
        return (V * s.unsqueeze(-2)) @ V.mT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gR: Tensor) -> tuple[Tensor, None]:
        lam, V, s, keep = ctx.saved_tensors
        ki, kj = keep.unsqueeze(-1), keep.unsqueeze(-2)
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        gap = lam.unsqueeze(-1) - lam.unsqueeze(-2)
        both = 1.0 / torch.where(ki & kj, si + sj, torch.ones_like(gap))
        safe = torch.where(ki ^ kj, gap, torch.ones_like(gap))
        mixed = (si - sj) / safe
        gamma = torch.where(ki & kj, both, torch.where(ki ^ kj, mixed, torch.zeros_like(gap)))
        g = V.mT @ (0.5 * (gR + gR.mT)) @ V
        return V @ (gamma * g) @ V.mT, None, None


def psd_root(S: Tensor, rcond: float | None = None) -> Tensor:
    """The symmetric root of a covariance ``S`` (*, N, N) over its eigenvalues above ``rcond``
    times the largest (default: ``rank_cutoff`` of float64 at order N): negative rounding and
    numerically null directions are dropped; the backward pass is finite for repeated
    eigenvalues (unlike a root from ``eigh``'s eigenvectors)."""
    S = 0.5 * (S + S.mT)
    if rcond is None:
        rcond = RANK_FACTOR * S.shape[-1] * torch.finfo(torch.float64).eps
    return _SqrtKept.apply(S, None, rcond)


class _PinvSqrt:
    """``(A^+)^{1/2}`` over the eigenvalues above ``cut``: :class:`_Spectral`'s first output."""

    @staticmethod
    def apply(A: Tensor, cut: Tensor) -> Tensor:
        return _Spectral.apply(A, cut)[0]


#: Rows whose normalised Gram matrix has eigenvalues below this fraction of the largest are nearly
#: dependent (an angle of about 1e-3 between a row and the span of the others).
NEAR_DEPENDENCE_RTOL = 1e-6
#: Nearly dependent rows conflict when satisfying them moves the mean by more than this many
#: times the size of the mean and of the residual.
CONFLICT_FACTOR = 1e3


def _warn_nearly_dependent(
    G: Tensor,  # (*gb, M, N)
    mean: Tensor,  # (*batch, N)
    r: Tensor,  # (*batch, M) float64: G mean - b
    call: str,
    sparse: _SparseRows | None = None,  # G's sparse form (its geometry is cached there)
) -> None:
    """Warn when nearly dependent rows state conflicting totals (checked only when ``A`` is
    ill-conditioned, so well-posed systems pay nothing).

    An ill-conditioned ``A = G Sigma G^T`` is common and harmless when the rows are well apart
    and the covariance leaves little freedom along some of their combinations (a smooth GP's
    masses at many times): the pseudo-inverse and the polish handle it. It is dangerous when the
    rows themselves are nearly dependent: then every combination ``u`` with ``u^T G`` of norm
    ``s ~ 0`` forces a move of at least ``|u^T r| / s`` on the mean, huge unless the totals
    agree. This looks at the rows' own geometry (the normalised Gram matrix, ``M x M``).
    """
    m = G.shape[-2]
    if m < 2:
        return
    norms, lam, U = _gram_geometry(G.to(F64)) if sparse is None else sparse.geometry()
    near = lam < NEAR_DEPENDENCE_RTOL * lam[..., -1:]
    if not bool(near.any()):
        return
    rn = r / norms  # residual of the normalised rows: (*batch, M)
    forced = (rn.unsqueeze(-2) @ U).squeeze(-2).abs() / lam.clamp_min(0).sqrt().clamp_min(
        torch.finfo(F64).tiny
    )  # (*batch, M): the least move each combination forces
    forced = torch.where(near, forced, torch.zeros_like(forced))
    scale = mean.detach().abs().amax().to(F64) + rn.abs().amax()
    worst = float(forced.amax())
    if not worst > CONFLICT_FACTOR * float(scale):
        return
    k = int(forced.reshape(-1, m).amax(0).argmax())
    u = U.reshape(-1, m, m)[0, :, k]
    rows = (u.abs() > 0.1 * u.abs().max()).nonzero().flatten().tolist()
    angle = float(lam.reshape(-1, m)[0, k].clamp_min(0).sqrt())
    warnings.warn(
        f"{call}: constraint rows {rows} are nearly dependent (a combination of the normalised "
        f"rows has norm {angle:.1e}) but state conflicting totals: satisfying them all moves the "
        f"mean by at least {worst:.3e}, against a mean of size {float(mean.abs().amax()):.3e}. "
        "If these rows state the same quantity, keep one of them (or make their totals agree); "
        "if they are meant to differ, state them on rows that are not nearly parallel, or add "
        "constraint noise (noise > 0) to weigh them.",
        ConditioningWarning,
        stacklevel=4,
    )


def _gram_geometry(G64: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Row norms and the eigen-decomposition of the normalised rows' Gram matrix (float64)."""
    norms = G64.norm(dim=-1).clamp_min(torch.finfo(F64).tiny)  # (*gb, M)
    Gn = G64 / norms.unsqueeze(-1)
    lam, U = torch.linalg.eigh(Gn @ Gn.mT)  # (*gb, M), (*gb, M, M)
    return norms, lam, U


def _solve_with(R: Tensor, v: Tensor) -> Tensor:
    """``A^+ v = R R^T v``; v: (*, M)."""
    if R.shape[-1] == 1 and R.shape[-2] == 1:
        return v * R[..., 0].square()
    return (R @ (R.mT @ v.unsqueeze(-1))).squeeze(-1)


def _inexact(mean: Tensor, G: Tensor, b: Tensor) -> bool:
    """Whether ``G mean = b`` misses by more than float64 rounding of the products (a solve with
    a badly conditioned ``A`` loses digits even when its Cholesky pivots look healthy)."""
    r = (_rowdot(G, mean) - b).abs()
    scale = _rowdot(G.abs(), mean.abs()) + b.abs()
    return bool((r > 64 * torch.finfo(F64).eps * scale).any())


def _polish(
    mean: Tensor,  # (*batch, N) float64
    G: Tensor,  # (*gb, M, N)
    b: Tensor,  # (*bb, M) float64
    w: Tensor | None,  # (*b, N) marginal variances, or None (Euclidean)
    call: str,
    sparse: _SparseRows | None = None,  # G's sparse form, if it has one
) -> tuple[Tensor, Tensor | None]:
    """Remove what is left of ``G mean - b`` with the metric ``diag(w)`` (or ``I``).

    Returns the corrected mean and the Cholesky factor of ``G diag(w) G^T`` (None if no
    correction was needed).
    """
    G64 = G.to(F64)
    r = _rowdot(G64, mean) - b
    P = G64.mT if w is None else w.to(F64).unsqueeze(-1) * G64.mT
    A = _gram(G64, P, sparse)
    diag = _check_rows(A, lambda: (G64.detach() != 0).any(-1), call)
    L, info = torch.linalg.cholesky_ex(A)
    ratio = L.detach().diagonal(dim1=-2, dim2=-1).square() / diag
    if bool((info != 0).any()) or not bool((ratio > PIVOT_RTOL).all()):
        raise _dependent(call)
    mean = mean - (P @ torch.cholesky_solve(r.unsqueeze(-1), L)).squeeze(-1)
    for _ in range(REFINE_STEPS):  # iterative refinement: an ill-conditioned G W G^T loses digits
        if not _inexact(mean.detach(), G64, b.detach()):
            break
        r = _rowdot(G64, mean) - b
        mean = mean - (P @ torch.cholesky_solve(r.unsqueeze(-1), L)).squeeze(-1)
    return mean, L
