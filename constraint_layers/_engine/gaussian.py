"""Pure tensor functions behind the conservation layer (private; public names in ``functional``).

A Gaussian ``u ~ N(mu, Sigma)`` on ``N`` points is conditioned on ``M`` linear constraints
``G u = b``, observed with noise ``sigma_G`` (ProbConserv, Hansen et al., ICML 2023)::

    A        = G Sigma G^T + diag(sigma_G^2)                 (M x M)
    mu~      = mu - Sigma G^T A^{-1} (G mu - b)
    Sigma~   = Sigma - Sigma G^T A^{-1} G Sigma = Sigma - F F^T,   F = Sigma G^T R,  A^{-1} = R R^T

The constraint algebra (``G mu``, ``A``, its inverse root ``R``) runs in float64; the results
come back in the input dtype. When ``A`` is numerically singular although the rows are
independent (the covariance leaves no freedom along some combination of them), ``R`` is a root of
the pseudo-inverse and a final correction in the metric of the marginal variances (the "polish")
keeps ``G mu~ = b`` exact. ``Sigma`` is diagonal (``variance``), diagonal plus low rank
(``low_rank``) or full (``covariance``); the diagonal path streams over the points in chunks
(O(N M) memory, never an ``N x N`` matrix). ``metric="euclidean"`` replaces ``Sigma`` by the
identity in the mean update (the HardC projection) and leaves the uncertainty as given.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._messages import under_call
from .._tolerance import model_rounding, psd_floor
from ..conservation.gaussian import (
    F64,
    METRICS,
    _check_matrix,
    _check_noise,
    _check_rhs,
    _check_variance,
    _Dense,
    _Diag,
    _float_tensor,
    _LowRank,
    _make_prior,
    _Prior,
)
from ..conservation.linalg import (
    _check_rows,
    _cutoff,
    _dependent,
    _gram,
    _inexact,
    _inverse_root,
    _polish,
    _rowdot,
    _solve_with,
    _warn_nearly_dependent,
    sparse_rows,
)
from ..conservation.posterior import ConstrainedGaussian
from ..errors import IndefiniteCovarianceWarning

__all__ = ["condition_gaussian", "conserve"]

#: Points per chunk of the streaming diagonal path (float64 temporaries stay in cache).
CHUNK = 1 << 17


def _apply_chunk(
    mu: Tensor,  # (*b, n) any float
    d: Tensor | None,  # (*b, n) any float, or None (Euclidean)
    G: Tensor,  # (*gb, M, n) any float
    coef: Tensor,  # (*batch, M) float64: A^{-1} (G mu - b)
    R: Tensor | None,  # (*batch, M, K) float64: A^+ = R R^T, or None (no variance update)
) -> tuple[Tensor, Tensor | None]:
    """The elementwise half of the update on a block of points (float64 out)."""
    Gt = G.to(F64).mT  # (*gb, n, M)
    P = Gt if d is None else d.to(F64).unsqueeze(-1) * Gt  # W G^T: (*batch, n, M)
    one = G.shape[-2] == 1
    step = P[..., 0] * coef if one else (P @ coef.unsqueeze(-1)).squeeze(-1)
    mean = mu.to(F64) - step
    if R is None:
        return mean, None
    F = P * R if one else P @ R  # (*batch, n, K)
    return mean, d.to(F64) - F.square().sum(-1)


def _chunks(n: int, rows: int) -> list[slice]:
    """Column blocks of about ``CHUNK`` values per intra-op thread (float64 temporaries of a block
    stay in cache; fewer blocks, fewer thread synchronisations)."""
    size = max(256, CHUNK * max(1, torch.get_num_threads()) // max(rows, 1))
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


class _Solved(NamedTuple):
    mean: Tensor  # (*batch, N) float64 or out dtype
    variance: Tensor | None
    root: Tensor  # (*batch, M, K): A^+ = R R^T
    G: Tensor  # (*gb, M, N) as used (noise-scaled)
    b: Tensor  # (*bb, M) as used
    s2: Tensor | None  # (*nb, M) noise variance as used
    cross: Tensor | None = None  # (*batch, N, M) W G^T when it was formed
    polish: Tensor | None = None  # (*batch, M, M) Cholesky factor of the polish step
    factor: Tensor | None = None  # (*batch, N, M) W G^T R when it was formed
    prior: Any = None  # the prior as conditioned (jittered or symmetrised), when it changed


def condition_gaussian(
    mean: Tensor,
    G: Tensor,
    b: float | Tensor = 0.0,
    *,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
) -> ConstrainedGaussian:
    """Condition a Gaussian on linear equality constraints ``G u = b`` (ProbConserv).

    With ``noise = 0`` the posterior mean satisfies ``G mean = b`` to rounding and the posterior
    covariance has ``G Sigma~ G^T = 0``: the mean solves
    ``min (u - mu)^T Sigma^{-1} (u - mu)  subject to  G u = b``. With ``noise -> inf`` the input
    comes back unchanged. The mean moves most where the model is least certain.

    Parameters
    ----------
    mean : Tensor
        shape: (*batch, N). The model's mean, flattened over its event axes (C order).
    G : Tensor
        shape: (M, N) shared, (*batch, M, N) per sample, or (N,) for one row.
    b : float or Tensor
        shape: (*batch, M) (or (*batch,) when ``G`` is one row), or a number.
    variance : Tensor, optional
        shape: (*batch, N). Marginal variances: ``Sigma = diag(variance)``. With ``low_rank``, the
        diagonal part of ``Sigma = diag(variance) + L L^T``.
    covariance : Tensor or linear operator, optional
        shape: (*batch, N, N). Full covariance (checked cheaply: symmetric, non-negative finite
        diagonal). A gpytorch ``LinearOperator`` stays lazy (only ``Sigma G^T`` is formed).
    low_rank : Tensor, optional
        shape: (*batch, N, K). Low-rank part ``L`` (an ensemble's centred members over ``sqrt(K)``).
    noise : float or Tensor, default 0.0
        Constraint noise standard deviation ``sigma_G``; a number, or shape (M,) / (*batch, M).
        ``inf`` ignores the row.
    metric : {"covariance", "euclidean"}, default "covariance"
        ``"covariance"``: the ProbConserv update with ``W = Sigma``. ``"euclidean"``: the HardC
        projection (``W = I``) of the mean; the uncertainty is returned as given. Without any
        uncertainty (a deterministic mean) the projection is Euclidean.

    Returns
    -------
    ConstrainedGaussian
        ``.mean`` and ``.variance`` (shape (*batch, N), the input dtype), the structured
        covariance ``Sigma - F F^T`` (``.factor``, ``.covariance()`` dense on request) and
        ``.sample(...)``.

    Raises
    ------
    ValueError
        Shapes that do not match (G's columns vs the output size, b's rows); a negative or NaN
        variance; a non-symmetric covariance; a NaN in the mean.
    SingularConstraintError
        ``noise = 0`` and a row that sees zero variance (add noise or use
        ``metric="euclidean"``), or linearly dependent rows.

    Notes
    -----
    Cost: diagonal ``Sigma``: O(N M^2) time, O(N M) memory, streamed in chunks when no gradient
    is needed (one read of the inputs for ``G mu`` and ``A``, one for the result); low rank
    ``K``: O(N (M + K) M); full: O(N^2 M) plus one Cholesky of the ``M x M`` matrix ``A``.
    The caller's tensors are never modified.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> mu = torch.tensor([1.0, 2.0, 3.0, 4.0])
    >>> var = torch.tensor([0.1, 0.1, 1.0, 0.1])
    >>> G, b = torch.ones(1, 4), torch.tensor([8.0])
    >>> post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    >>> post.mean  # the uncertain point moves most
    tensor([0.8462, 1.8462, 1.4615, 3.8462])
    >>> float(post.mean.sum())
    8.0

    References
    ----------
    Hansen, Maddix, Alizadeh, Gupta, Mahoney. Learning Physical Models that Can Respect
    Conservation Laws. ICML 2023. arXiv:2302.11002.
    """
    call = "condition_gaussian"
    _float_tensor(mean, "mean", call)
    if mean.ndim == 0:
        raise ValueError(f"{call}: mean must have shape (*batch, N), got a scalar.")
    n = mean.shape[-1]
    if metric not in METRICS:
        raise ValueError(f"{call}: metric must be one of {METRICS}, got {metric!r}.")
    G, single = _check_matrix(G, n, call)
    m = G.shape[-2]
    b = _check_rhs(b, single, m, call)
    prior = _make_prior(variance, covariance, low_rank, n, call)
    s = _check_noise(noise, m, call)
    out_dtype = mean.dtype
    if variance is not None:
        out_dtype = torch.promote_types(out_dtype, variance.dtype)
    post_metric = metric if prior is not None else "euclidean"
    if m == 0:
        var = None if prior is None else prior.diag().to(out_dtype)
        return ConstrainedGaussian._make(mean, var, prior, None, G, b, None, post_metric)
    solved = _solve(mean, G, b, prior, s, post_metric, call)
    var = solved.variance
    if var is None and prior is not None:
        var = prior.diag()  # Euclidean: the uncertainty as given
    mean_out = solved.mean.to(out_dtype)
    var_out = None if var is None else var.to(out_dtype)
    used = prior if solved.prior is None else solved.prior
    out = ConstrainedGaussian._make(
        mean_out, var_out, used, solved.root, solved.G, solved.b, solved.s2, post_metric
    )
    out._P = solved.cross
    out._polish = solved.polish
    out._F = solved.factor  # F = W G^T R, already formed for the variance (or None)
    return out


def conserve(
    mean: Tensor,
    G: Tensor,
    b: float | Tensor = 0.0,
    *,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
) -> ConstrainedGaussian:
    """Deprecated alias of :func:`condition_gaussian` (the same arguments and result).

    The general Gaussian conditioning kernel was first named ``conserve`` after the conservation
    layer that used it; it conditions on any linear rows, so it is now named for what it does.
    Calling ``conserve`` warns (``DeprecationWarning``) and runs :func:`condition_gaussian`;
    error messages name ``conserve``.
    """
    warnings.warn(
        "cl.functional.conserve is deprecated: it is the general Gaussian conditioning kernel, "
        "now named cl.functional.condition_gaussian (same arguments, same result). Replace "
        "conserve(...) by condition_gaussian(...); the alias will be removed in a later release.",
        DeprecationWarning,
        stacklevel=2,
    )
    with under_call("conserve"):
        return condition_gaussian(
            mean, G, b, variance=variance, covariance=covariance, low_rank=low_rank, noise=noise,
            metric=metric,
        )  # fmt: skip


def _solve(mean, G, b, prior, s, metric, call) -> _Solved:
    # Noise as a row rescaling: the rows g/sqrt(1+s^2), noise s/sqrt(1+s^2) (an infinite noise
    # gives a zero row with unit noise: ignored exactly).
    s2 = None
    if s is not None:
        sq = s.square()
        c = torch.where(torch.isinf(sq), torch.zeros_like(sq), (1 + sq).rsqrt())
        G = G.to(F64) * c.unsqueeze(-1)
        b = b * c
        s2 = torch.where(torch.isinf(sq), torch.ones_like(sq), sq / (1 + sq))
    streaming = isinstance(prior, _Diag) or (prior is None or metric == "euclidean")
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(t, Tensor) and t.requires_grad
        for t in (mean, G, b, s2, getattr(prior, "d", None))
    )
    d = prior.d if isinstance(prior, _Diag) else None
    if streaming and not needs_grad:
        return _solve_streaming(mean, G, b, d, s2, metric, prior, call)
    # ---- one pass over whole tensors (autograd, full and low-rank covariances)
    if isinstance(prior, (_Diag, _LowRank)) and prior.d is not None:
        _check_variance(prior.d, "variance", call)
    G64 = G.to(F64)
    sparse = None if needs_grad else sparse_rows(G64)
    r = _rowdot(G64, mean.to(F64)) - b
    _check_residual(r, call)
    source = _source_dtype(prior, mean)
    if metric == "euclidean":
        P = G64.mT  # (*, N, M)
    elif isinstance(prior, _Dense):
        P = prior.cross_checked(G64.mT, call)
        prior, P = _symmetric_prior(prior, P, G64, call)
    else:
        P = prior.cross(G64.mT)
    A = _gram(G64, P, sparse)
    n = mean.shape[-1]
    if metric == "covariance" and isinstance(prior, _Dense):
        A = 0.5 * (A + A.mT)
        prior, P, A = _psd_rows(prior, P, A, G64, source, call)
    if s2 is not None:
        A = A + torch.diag_embed(s2)
    cut = _cutoff(A, source, n) if metric == "covariance" else None
    root = _inverse_root(A, lambda: (G64.detach() != 0).any(-1), metric, call, cut)
    if root.polish and s2 is None:
        _warn_nearly_dependent(G64.detach(), mean.detach(), r.detach(), call, sparse)
    coef = _solve_with(root.R, r)
    mean_t = mean.to(F64) - (P @ coef.unsqueeze(-1)).squeeze(-1)
    var_t = F = None
    if metric == "covariance":
        F = P @ root.R
        d = prior.diag()
        strict = isinstance(prior, _Dense) and not prior.from_model
        var_t = _clamped(d - F.square().sum(-1), d, source, n, root.condition, strict, call)
    chol2 = None
    if s2 is None and (root.polish or _inexact(mean_t, G64, b)):
        w = None if metric == "euclidean" else prior.diag()
        mean_t, chol2 = _polish(mean_t, G64, b, w, call, sparse)
    return _Solved(mean_t, var_t, root.R, G, b, s2, P, chol2, F, prior)


def _check_residual(r: Tensor, call: str) -> None:
    if not bool(torch.isfinite(r.detach()).all()):
        raise ValueError(
            f"{call}: the residual G mean - b is not finite: the mean, G or b holds NaN or inf."
        )


# ------------------------------------------------------------ PSD policy of a model covariance
#: How to make the warnings below an error, and how to avoid them (named in their messages).
_CONTROL = (
    "The model's covariance is inaccurate (typical of float32 or conjugate-gradient GP "
    "posteriors); compute it more accurately (float64; for gpytorch, a larger "
    "gpytorch.settings.max_cholesky_size or gpytorch.settings.fast_computations(solves=False)), "
    "or make this an error with warnings.filterwarnings('error', "
    "category=cl.errors.IndefiniteCovarianceWarning)."
)


def _source_dtype(prior: _Prior | None, mean: Tensor) -> torch.dtype:
    """The precision the uncertainty was computed in (judges its rounding)."""
    if isinstance(prior, _Dense):
        return prior.S.dtype
    if isinstance(prior, _LowRank):
        return prior.L.dtype
    if isinstance(prior, _Diag):
        return prior.d.dtype
    return mean.dtype


def _symmetric_prior(prior: _Dense, P: Tensor, G: Tensor, call: str) -> tuple[_Dense, Tensor]:
    """A lazy covariance whose ``G Sigma G^T`` is not symmetric beyond its rounding (a CG-based
    posterior): condition its symmetric part ``(Sigma + Sigma^T) / 2``, evaluated once as a
    dense tensor (shape (*batch, N, N)), with a warning, so that the covariance returned is the
    one conditioned (``G Sigma~ G^T = 0``)."""
    if not prior.from_model:
        return prior, P  # dense tensors: probed in cross_checked (an error: the user's matrix)
    A = _gram(G, P, None).detach()
    gap = float((A - A.mT).abs().amax()) if A.numel() else 0.0
    scale = float(A.diagonal(dim1=-2, dim2=-1).abs().amax()) if A.numel() else 0.0
    if not gap > model_rounding(prior.S.dtype, scale):  # rounding: A is symmetrised below
        return prior, P
    warnings.warn(
        f"{call}: the model's covariance is not symmetric: G Sigma G^T differs from its "
        f"transpose by {gap:.3e} (its largest entry {scale:.3e}); its symmetric part "
        f"(Sigma + Sigma^T) / 2 is conditioned and returned. {_CONTROL}",
        IndefiniteCovarianceWarning,
        stacklevel=5,
    )
    # its products are not reproducible either (each runs its own iterative solve): evaluate it
    # once, so that the covariance returned is exactly the one conditioned
    D = prior.S.to_dense()
    sym = _Dense(0.5 * (D + D.mT))
    sym.from_model = True
    return sym, sym.cross(G.mT)


def _psd_rows(
    prior: _Dense, P: Tensor, A: Tensor, G: Tensor, source: torch.dtype, call: str
) -> tuple[_Dense, Tensor, Tensor]:
    """``A = G Sigma G^T`` indefinite beyond rounding: clamp its negative eigenvalues to 0, as
    gpytorch's eigendecomposition fallback does, by the least change of ``Sigma`` that does it:
    ``Sigma + H H^T`` with ``H = G^T C^{-1} (-A_-)^{1/2}`` (``C = G G^T``, ``A_-`` the negative
    part of ``A``; rank ``M``, along the rows only), with a warning. That covariance is the one
    conditioned and returned, so ``G Sigma~ G^T = 0``. Rounding (down to ``psd_floor``) passes
    silently: the pseudo-inverse drops it."""
    m, n = A.shape[-1], G.shape[-1]
    Ad = A.detach()
    lam, U = torch.linalg.eigh(Ad)
    scale = Ad.diagonal(dim1=-2, dim2=-1).abs().amax(-1)
    floor = psd_floor(source, scale, m) + psd_floor(F64, scale, n)
    if not bool((lam[..., 0] < -floor).any()):
        return prior, P, A  # rounding: the pseudo-inverse drops it
    low = float(lam[..., 0].amin())
    floor = torch.maximum(floor, model_rounding(source, scale))  # beyond: inaccurate, say so
    loud = bool((lam[..., 0] < -floor).any())
    if not prior.from_model and loud:  # the caller's own matrix: say so, change nothing
        raise ValueError(
            f"{call}: the covariance is not positive semidefinite: G Sigma G^T has an "
            f"eigenvalue {low:.3e} (rounding reaches {-float(floor.amax()):.1e}). Pass a "
            "symmetric positive semidefinite covariance."
        )
    Gd = G.detach()
    C = Gd @ Gd.mT
    Lc, info = torch.linalg.cholesky_ex(C)
    if bool((info != 0).any()):
        raise _dependent(call)
    neg = (-lam).clamp_min(0)  # (*, M)
    root = U * neg.sqrt().unsqueeze(-2)  # (-A_-)^{1/2} up to rotation: (*, M, M)
    H = Gd.mT @ torch.cholesky_solve(root, Lc)  # (*, N, M)
    if loud:
        _warn_clamp(call, low, floor, m, H)
    S = prior.S
    if hasattr(S, "add_low_rank"):  # a linear operator: stays lazy
        fixed = _Dense(S.add_low_rank(H.to(S.dtype), generate_roots=False))
    else:
        fixed = _Dense(S + (H @ H.mT).to(S.dtype))
    fixed.from_model = prior.from_model
    clamp = (U * neg.unsqueeze(-2)) @ U.mT  # -A_-
    return fixed, P + Gd.mT @ torch.cholesky_solve(clamp, Lc), A + clamp


def _warn_clamp(call: str, low: float, floor: Tensor, m: int, H: Tensor) -> None:
    warnings.warn(
        f"{call}: the model's covariance is not positive semidefinite beyond rounding: "
        f"G Sigma G^T has an eigenvalue {low:.3e} (rounding reaches "
        f"{-float(floor.amax()):.1e}). Its negative eigenvalues were clamped to 0 (a rank-"
        f"{m} correction of Sigma along the constraint rows, largest added variance "
        f"{float(H.square().sum(-1).amax()):.3e}), and that covariance is conditioned and "
        f"returned, so that G Sigma~ G^T = 0. {_CONTROL}",
        IndefiniteCovarianceWarning,
        stacklevel=5,
    )


def _clamped(
    v: Tensor, d: Tensor, source: torch.dtype, n: int, condition: float, strict: bool, call: str
) -> Tensor:
    """Conditioned marginal variances ``d - |F|^2`` clamped to 0: silently where the negative
    values are rounding (``psd_floor`` at the largest variance, the solve's condition number);
    beyond, a model's covariance (a linear operator) is indefinite there: clamped with a
    warning, as gpytorch clamps its negative variances; a caller's own matrix (``strict``):
    an error."""
    vd = v.detach()
    scale = d.detach().abs().amax(-1, keepdim=True)
    floor = psd_floor(source, scale) + psd_floor(F64, scale, n, condition)
    floor = torch.maximum(floor, model_rounding(source, scale))
    if bool((vd + floor < 0).any()):
        if strict:
            raise ValueError(
                f"{call}: the covariance is not positive semidefinite: conditioning made a "
                f"marginal variance negative ({float(vd.amin()):.3e}; rounding reaches "
                f"{-float(floor.amax()):.1e} at the largest variance {float(scale.amax()):.3e})."
                " Pass a symmetric positive semidefinite covariance."
            )
        warnings.warn(
            f"{call}: the model's covariance is not positive semidefinite beyond rounding: "
            f"conditioning made a marginal variance negative ({float(vd.amin()):.3e}; rounding "
            f"reaches {-float(floor.amax()):.1e} at the largest variance "
            f"{float(scale.amax()):.3e}). Negative variances are clamped to 0, as gpytorch "
            f"clamps its own. {_CONTROL}",
            IndefiniteCovarianceWarning,
            stacklevel=5,
        )
    return v.clamp_min(0)


def _solve_one_row(mean, G, b, d, s2, metric, call) -> _Solved:
    """One constraint row, diagonal or Euclidean, no autograd: the memory-bound fast path.

    Pass 1 accumulates ``g . mu`` and ``a = sum g^2 d`` in float64 over cache-sized chunks;
    pass 2 writes ``mu - (d g) r / a`` and ``d - (d g)^2 / a`` once, in the input dtype, with
    fused multiply-adds (the step is formed in the input dtype: its rounding is that of the
    stored result).
    """
    n = mean.shape[-1]
    g = G[..., 0, :]  # (*gb, N)
    w = None if metric == "euclidean" else d  # the metric's diagonal
    batch = torch.broadcast_shapes(
        mean.shape[:-1], g.shape[:-1], b.shape[:-1], () if d is None else d.shape[:-1],
        () if s2 is None else s2.shape[:-1],
    )  # fmt: skip
    parts = _chunks(n, max(1, math.prod(batch)))
    r = torch.zeros(batch, dtype=F64, device=mean.device)
    a = torch.zeros(batch, dtype=F64, device=mean.device)
    # float64 inputs and one shared row: BLAS dot products (float64 accumulation, no temporary)
    blas = g.dim() >= 1 and g[..., 0].numel() == 1 and mean.dtype == g.dtype == F64
    blas = blas and (d is None or d.dtype == F64)
    g1 = g.reshape(-1) if blas else None
    for sl in parts:  # pass 1
        gc = g1[sl] if blas else g[..., sl]
        if d is not None:
            dc = d[..., sl]
            if not float(dc.amin()) >= 0:  # NaN or negative: say which
                _check_variance(d, "variance", call)
        wg = gc if w is None else dc * gc
        if blas:
            r += mean[..., sl] @ gc
            a += wg @ gc
        else:  # products in the input dtype, sums accumulated in float64
            r += (mean[..., sl] * gc).sum(-1, dtype=F64)
            a += (wg * gc).sum(-1, dtype=F64)
    r -= b[..., 0]
    _check_residual(r, call)
    if d is not None and not bool(torch.isfinite(a).all()):  # an infinite variance: say so
        _check_variance(d, "variance", call)
    A = a.reshape(*batch, 1, 1)
    if s2 is not None:
        A = A + s2.reshape(*s2.shape, 1)
    _check_rows(A, lambda: (G != 0).any(-1), call)
    R = A.rsqrt()  # (*batch, 1, 1)
    coef = r * R[..., 0, 0].square()
    dtype = torch.promote_types(mean.dtype, g.dtype if w is None else w.dtype)
    step = (-coef).to(dtype).unsqueeze(-1)
    out_mean = torch.empty((*batch, n), dtype=dtype, device=mean.device)
    out_var = None
    if metric == "covariance":
        out_var = torch.empty((*batch, n), dtype=dtype, device=mean.device)
        shrink = (-R[..., 0].square()).to(dtype)  # (*batch, 1)
    scalar = step.numel() == 1  # one sample: the factors as Python numbers (fewer passes)
    for sl in parts:  # pass 2: written once
        gc = g[..., sl].to(dtype)
        t = gc if w is None else w[..., sl].to(dtype) * gc  # W g
        mc = mean[..., sl].to(dtype)
        if scalar:
            torch.add(mc, t, alpha=float(step), out=out_mean[..., sl])
        else:
            torch.addcmul(mc, t, step, out=out_mean[..., sl])
        if out_var is not None:
            dc = d[..., sl].to(dtype)
            if scalar:
                torch.addcmul(dc, t, t, value=float(shrink), out=out_var[..., sl])
            else:
                torch.addcmul(dc, t, t * shrink, out=out_var[..., sl])
            out_var[..., sl].clamp_(min=0)
    return _Solved(out_mean, out_var, R, G, b, s2)


def _solve_streaming(mean, G, b, d, s2, metric, prior, call) -> _Solved:
    """Diagonal or Euclidean update without autograd: two passes over chunks of points."""
    n = mean.shape[-1]
    m = G.shape[-2]
    if m == 1:
        return _solve_one_row(mean, G, b, d, s2, metric, call)
    batch = torch.broadcast_shapes(
        mean.shape[:-1], G.shape[:-2], b.shape[:-1], () if d is None else d.shape[:-1],
        () if s2 is None else s2.shape[:-1],
    )  # fmt: skip
    rows = max(1, math.prod(batch)) * max(m, 1)
    parts = _chunks(n, rows)
    r = torch.zeros((*batch, m), dtype=F64, device=mean.device)
    A = torch.zeros((*batch, m, m), dtype=F64, device=mean.device)
    for sl in parts:  # pass 1: G mu and A = G W G^T, accumulated in float64
        Gc = G[..., sl].to(F64)
        r += _rowdot(Gc, mean[..., sl].to(F64))
        if d is not None:
            dc = d[..., sl].to(F64)
            if not float(dc.amin()) >= 0:  # NaN or negative: say which
                _check_variance(d, "variance", call)
        if metric == "euclidean":
            A += Gc @ Gc.mT
        else:
            A += (Gc * dc.unsqueeze(-2)) @ Gc.mT
    r -= b
    _check_residual(r, call)
    if d is not None and not bool(torch.isfinite(A).all()):  # an infinite variance: say so
        _check_variance(d, "variance", call)
    if s2 is not None:
        A = A + torch.diag_embed(s2)
    root = _inverse_root(A, lambda: (G != 0).any(-1), metric, call)
    if root.polish and s2 is None:
        _warn_nearly_dependent(G, mean, r, call)
    coef = _solve_with(root.R, r)
    R = root.R if metric == "covariance" else None
    polish = root.polish and s2 is None
    dtype = F64 if len(parts) == 1 or polish else mean.dtype
    out_mean = torch.empty((*batch, n), dtype=dtype, device=mean.device)
    out_var = None
    if R is not None:
        out_var = torch.empty((*batch, n), dtype=dtype, device=mean.device)
    wd = None if metric == "euclidean" else d
    for sl in parts:  # pass 2: the elementwise update, written once
        mc, vc = _apply_chunk(
            mean[..., sl], None if wd is None else wd[..., sl], G[..., sl], coef, R
        )
        out_mean[..., sl] = mc
        if vc is not None:
            out_var[..., sl] = vc.clamp_min(0)
    chol2 = None
    if polish:  # rare: an ill-conditioned system; one more pass, in float64
        out_mean, chol2 = _polish(out_mean, G, b, wd, call)
    return _Solved(out_mean, out_var, root.R, G, b, s2, None, chol2)
