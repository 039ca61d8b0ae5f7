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
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..errors import ConditioningWarning, SingularConstraintError

__all__ = [
    "ConstrainedGaussian",
    "DegenerateGaussian",
    "Gaussian",
    "MixtureMoments",
    "RunningMoments",
    "conserve",
    "conserve_mixture",
]

F64 = torch.float64
METRICS = ("covariance", "euclidean")
#: Points per chunk of the streaming diagonal path (float64 temporaries stay in cache).
CHUNK = 1 << 17
#: A squared Cholesky pivot below this fraction of its diagonal entry means dependent rows.
PIVOT_RTOL = 1e-12
#: Below this pivot ratio the update is followed by an exactness correction (the polish step).
POLISH_RTOL = 1e-6
#: Relative asymmetry tolerated in a covariance matrix, by dtype.
SYMMETRY_RTOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}


class Gaussian(NamedTuple):
    """A Gaussian model output as adapters hand it to the conservation layer (and get it back).

    ``Sigma = diag(variance) + low_rank @ low_rank^T``, or ``covariance`` when given; a posterior
    coming back from the layer may add ``downdate``: ``Sigma~ = covariance - downdate downdate^T``
    (so that a lazy covariance stays lazy). A deterministic output has neither variance nor
    covariance.
    """

    mean: Tensor  # shape: (*batch, *event)
    variance: Tensor | None = None  # shape: (*batch, *event); the diagonal (part) of Sigma
    covariance: Any = None  # shape: (*batch, N, N), N = prod(event); a Tensor or linear operator
    low_rank: Tensor | None = None  # shape: (*batch, N, K)
    downdate: Tensor | None = None  # shape: (*batch, N, M); posteriors of a covariance only
    event_ndim: int = 1
    #: The structured posterior (a :class:`ConstrainedGaussian` over the flattened event, in the
    #: record's units) when the layer formed one: adapters build exact sampling roots and the
    #: degenerate density from it. None for inputs and for diagonal fast paths.
    conditioned: Any = None


# ------------------------------------------------------------------------------- validation
def _float_tensor(x: object, name: str, call: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{call}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{call}: {name} must be a floating-point tensor, got dtype {x.dtype}. Convert it "
            "with .double() or .float()."
        )
    return x


def _check_matrix(G: object, n: int, call: str) -> tuple[Tensor, bool]:
    """``G`` as ``(*batch, M, N)`` (``(N,)`` is one row); returns (G, single_row)."""
    if not isinstance(G, Tensor):
        raise TypeError(
            f"{call}: G must be a tensor of shape (M, N) or (*batch, M, N) (or (N,) for one row), "
            f"got {type(G).__name__}."
        )
    if not (G.is_floating_point() or G.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{call}: G must hold real numbers, got dtype {G.dtype}.")
    single = G.ndim == 1
    if single:
        G = G.unsqueeze(0)
    if G.ndim < 2 or G.shape[-1] != n:
        raise ValueError(
            f"{call}: G must have one column per output point: expected shape (M, {n}) or "
            f"(*batch, M, {n}) for a mean with {n} points in its last axis, got G of shape "
            f"{tuple(G.shape if not single else G.shape[1:])}. Flatten the output's event axes "
            "(C order) to match, or build G with cl.Conservation.integral."
        )
    return G, single


def _check_rhs(b: object, single: bool, m: int, call: str) -> Tensor:
    """``b`` as a float64 tensor broadcastable to ``(*batch, M)``."""
    if isinstance(b, bool) or not isinstance(b, (int, float, Tensor)):
        raise TypeError(
            f"{call}: b must be a number or a tensor of shape (*batch, M), got {type(b).__name__}."
        )
    bt = torch.as_tensor(b)
    if not bt.is_floating_point():
        bt = bt.to(F64)
    if single and bt.ndim >= 1 and bt.shape[-1] != 1:
        bt = bt.unsqueeze(-1)  # one row: b of shape (*batch,)
    elif single and bt.ndim == 0:
        bt = bt.reshape(1)
    if bt.ndim == 0:
        return bt.to(F64).expand(m)
    if bt.shape[-1] not in (1, m):
        shape = "(*batch,)" if single else f"(*batch, {m})"
        raise ValueError(
            f"{call}: b must hold one value per constraint row: expected shape {shape} (or a "
            f"number), got b of shape {tuple(torch.as_tensor(b).shape)} for G with {m} row(s)."
        )
    return bt.to(F64)


def _check_noise(noise: object, m: int, call: str) -> Tensor | None:
    """Constraint noise (std) as float64 ``(*batch, M)``, or None when it is zero."""
    if type(noise) in (int, float) and noise == 0:
        return None
    if isinstance(noise, bool) or not isinstance(noise, (int, float, Tensor)):
        raise TypeError(
            f"{call}: noise must be a number or a tensor of shape (M,) or (*batch, M) (standard "
            f"deviations), got {type(noise).__name__}."
        )
    nt = noise if isinstance(noise, Tensor) else torch.tensor(float(noise), dtype=F64)
    if nt.ndim and nt.shape[-1] not in (1, m):
        raise ValueError(
            f"{call}: noise must be a number or hold one standard deviation per constraint row "
            f"(last axis {m}), got shape {tuple(nt.shape)}."
        )
    ndet = nt.detach()
    if bool(torch.isnan(ndet).any()) or bool((ndet < 0).any()):
        raise ValueError(
            f"{call}: noise must be non-negative standard deviations (inf allowed: the row is "
            f"ignored), got {ndet.flatten()[:8].tolist()}."
        )
    if not nt.requires_grad and bool((ndet == 0).all()):
        return None
    nt = nt.to(F64)
    return nt.reshape(1).expand(m) if nt.ndim == 0 else nt


def _check_variance(var: Tensor, name: str, call: str) -> None:
    """One pass: NaN propagates through ``amin``; negative values show up in it."""
    if var.numel() == 0:
        return
    low = float(var.detach().amin())
    if not low >= 0:
        what = "NaN" if math.isnan(low) else f"a negative value ({low:.3e})"
        raise ValueError(
            f"{call}: {name} must be non-negative and finite, but it holds {what}. Pass "
            "variances (squared standard deviations), not log-variances; check the model's head."
        )


def _check_covariance(cov: Tensor, call: str) -> None:
    """O(N) checks of a dense covariance: square, finite non-negative diagonal. (Symmetry is
    probed inside the product ``Sigma G^T``, see :meth:`_Dense.cross_checked`.)"""
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(
            f"{call}: covariance must be square, shape (*batch, N, N); got {tuple(cov.shape)}."
        )
    _check_variance(cov.detach().diagonal(dim1=-2, dim2=-1), "the covariance's diagonal", call)


def _probe_symmetry(SV: Tensor, V: Tensor, dtype: torch.dtype, call: str) -> None:
    """``v^T (S w)`` against ``w^T (S v)`` for two random probes: a cheap symmetry test that
    costs two extra columns in the product ``S [G^T, v, w]``."""
    v, w = V[:, 0], V[:, 1]
    Sv, Sw = SV[..., 0].detach(), SV[..., 1].detach()
    gap = ((Sw * v).sum(-1) - (Sv * w).sum(-1)).abs()
    scale = v.norm() * (Sw.norm(dim=-1) + Sv.norm(dim=-1)) + torch.finfo(SV.dtype).tiny
    ratio = float((gap / scale).amax())
    if not ratio <= SYMMETRY_RTOL.get(dtype, 1e-5):
        raise ValueError(
            f"{call}: covariance must be symmetric, but a random probe finds "
            f"|v^T (S - S^T) w| = {ratio:.2e} relative to |v| |S w| (tolerance "
            f"{SYMMETRY_RTOL.get(dtype, 1e-5):.0e} for {dtype}). Symmetrise it, e.g. "
            "0.5 * (S + S.mT)."
        )


# ---------------------------------------------------------------------------------- priors
class _Prior:
    """Sigma in one of its structured forms; every method returns float64."""

    batch_shape: torch.Size

    def cross(self, Gt: Tensor) -> Tensor:  # Gt: (*b, N, M) -> Sigma Gt: (*b, N, M)
        raise NotImplementedError

    def diag(self) -> Tensor:  # (*b, N)
        raise NotImplementedError

    def dense(self) -> Tensor:  # (*b, N, N)
        raise NotImplementedError

    def draw(self, shape: Sequence[int], n: int, generator: Any) -> Tensor:
        """Zero-mean samples of N(0, Sigma): shape (*shape, N) (shape ends with the batch)."""
        raise NotImplementedError


def _randn(shape, generator, device) -> Tensor:
    return torch.randn(*shape, dtype=F64, device=device, generator=generator)


class _Diag(_Prior):
    def __init__(self, d: Tensor) -> None:
        self.d = d  # (*b, N), any float dtype
        self.batch_shape = d.shape[:-1]

    def cross(self, Gt):
        return self.d.to(F64).unsqueeze(-1) * Gt

    def diag(self):
        return self.d.to(F64)

    def dense(self):
        return torch.diag_embed(self.d.to(F64))

    def draw(self, shape, n, generator):
        return _randn((*shape, n), generator, self.d.device) * self.d.to(F64).sqrt()


class _LowRank(_Prior):
    def __init__(self, d: Tensor | None, L: Tensor) -> None:
        self.d, self.L = d, L  # (*b, N) or None; (*b, N, K)
        shapes = [L.shape[:-2]] + ([] if d is None else [d.shape[:-1]])
        self.batch_shape = torch.broadcast_shapes(*shapes)

    def cross(self, Gt):
        L = self.L.to(F64)
        out = L @ (L.mT @ Gt)
        return out if self.d is None else out + self.d.to(F64).unsqueeze(-1) * Gt

    def diag(self):
        v = self.L.to(F64).square().sum(-1)
        return v if self.d is None else v + self.d.to(F64)

    def dense(self):
        L = self.L.to(F64)
        out = L @ L.mT
        return out if self.d is None else out + torch.diag_embed(self.d.to(F64))

    def draw(self, shape, n, generator):
        L = self.L.to(F64)
        eta = _randn((*shape, L.shape[-1], 1), generator, L.device)
        out = (L @ eta).squeeze(-1)
        if self.d is not None:
            out = out + _randn((*shape, n), generator, L.device) * self.d.to(F64).sqrt()
        return out


class _Dense(_Prior):
    def __init__(self, S: Any) -> None:
        self.S = S  # (*b, N, N): a tensor, or a linear operator (matmul, diagonal, to_dense)
        self.batch_shape = torch.Size(S.shape[:-2])
        self.lazy = not isinstance(S, Tensor)
        self._diag: Tensor | None = None

    def cross(self, Gt):
        if self.lazy:
            return self.S.matmul(Gt.to(self.S.dtype)).to(F64)
        return (self.S @ Gt.to(self.S.dtype)).to(F64)

    def cross_checked(self, Gt: Tensor, call: str) -> Tensor:
        """``Sigma G^T``, with the symmetry probe riding along (dense tensors only)."""
        if self.lazy:
            return self.cross(Gt)
        n = Gt.shape[-2]
        gen = torch.Generator(device=self.S.device).manual_seed(0)
        V = torch.randn(n, 2, dtype=self.S.dtype, device=self.S.device, generator=gen)
        Gt = Gt.to(self.S.dtype)
        out = self.S @ torch.cat([Gt, V.expand(*Gt.shape[:-2], n, 2)], dim=-1)
        _probe_symmetry(out[..., -2:], V, self.S.dtype, call)
        return out[..., :-2].to(F64)

    def diag(self):
        if self._diag is None:  # a lazy operator's diagonal can cost O(N K): compute it once
            self._diag = self.S.diagonal(dim1=-2, dim2=-1).to(F64)
        return self._diag

    def dense(self):
        return (self.S.to_dense() if self.lazy else self.S).to(F64)

    def draw(self, shape, n, generator):
        S = self.dense()
        root, info = torch.linalg.cholesky_ex(S)
        if bool((info != 0).any()):  # positive semidefinite but singular: a root from eigh
            lam, vec = torch.linalg.eigh(S)
            root = vec * lam.clamp_min(0).sqrt().unsqueeze(-2)
        eps = _randn((*shape, n, 1), generator, S.device)
        return (root @ eps).squeeze(-1)


def _make_prior(variance, covariance, low_rank, n: int, call: str) -> _Prior | None:
    if covariance is not None:
        if variance is not None or low_rank is not None:
            raise ValueError(
                f"{call}: give the uncertainty once: variance= (diagonal), variance= with "
                "low_rank= (diagonal plus low rank), or covariance= (full); got covariance= "
                "together with another."
            )
        if isinstance(covariance, Tensor):
            _float_tensor(covariance, "covariance", call)
            _check_covariance(covariance, call)
        elif not all(hasattr(covariance, a) for a in ("matmul", "diagonal", "to_dense", "shape")):
            raise TypeError(
                f"{call}: covariance must be a tensor of shape (*batch, N, N) or a linear operator "
                f"(with matmul, diagonal, to_dense), got {type(covariance).__name__}."
            )
        if tuple(covariance.shape[-2:]) != (n, n):
            raise ValueError(
                f"{call}: covariance must have shape (*batch, {n}, {n}) for a mean with {n} "
                f"points, got {tuple(covariance.shape)}."
            )
        return _Dense(covariance)
    if variance is not None:
        _float_tensor(variance, "variance", call)
        if variance.ndim == 0 or variance.shape[-1] not in (1, n):
            raise ValueError(
                f"{call}: variance must have shape (*batch, {n}) (broadcastable to the mean), "
                f"got {tuple(variance.shape)}."
            )
    if low_rank is not None:
        _float_tensor(low_rank, "low_rank", call)
        if low_rank.ndim < 2 or low_rank.shape[-2] != n:
            raise ValueError(
                f"{call}: low_rank must have shape (*batch, {n}, K) (Sigma = diag(variance) + "
                f"L L^T), got {tuple(low_rank.shape)}."
            )
        return _LowRank(variance, low_rank)
    if variance is not None:
        return _Diag(variance)
    return None


# ------------------------------------------------------------------------------ the update
def _rowdot(G: Tensor, x: Tensor) -> Tensor:
    """``G x`` for G (*gb, M, N) and x (*xb, N): (*batch, M)."""
    if G.ndim == 2:
        return x @ G.mT
    return (G @ x.unsqueeze(-1)).squeeze(-1)


def _check_rows(
    A: Tensor, nonzero: Callable[[], Tensor], call: str, allow_tiny: bool = False
) -> Tensor:
    """Zero or negative diagonal entries of ``A``: a SingularConstraintError that says what to do.

    ``nonzero()`` (shape (*gb, M), bool): whether each row of G has a non-zero entry (evaluated
    only to word the error). ``allow_tiny``: let entries that are zero to rounding (within
    ``PIVOT_RTOL`` of the largest, either sign, not exactly zero) through to the pseudo-inverse.
    Returns the diagonal of ``A`` (detached).
    """
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    bad = ~(diag > 0)
    if allow_tiny and bool(bad.any()):
        scale = diag.abs().amax(-1, keepdim=True)
        bad = bad & ((diag == 0) | (diag < -PIVOT_RTOL * scale))
    if bool(bad.any()):
        idx = bad.nonzero()[0].tolist()
        row, where = idx[-1], (f" (batch index {tuple(idx[:-1])})" if len(idx) > 1 else "")
        if bool(diag[tuple(idx)] < 0) and bool(
            diag[tuple(idx)] < -PIVOT_RTOL * diag[tuple(idx[:-1])].abs().amax()
        ):
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
    """``A^+ = R R^T`` (R: (*, M, K)); ``polish``: finish with an exactness correction."""

    R: Tensor
    polish: bool


def _inverse_root(A: Tensor, nonzero: Callable[[], Tensor], metric: str, call: str) -> _Root:
    """A root of the (pseudo-)inverse of ``A = G W G^T + noise^2 I`` (float64).

    Well-conditioned ``A``: ``R = L^{-T}`` from its Cholesky factor. When the covariance leaves
    (numerically) no freedom along some combination of the rows (a smooth GP's masses at many
    times, a low-rank ensemble with fewer members than rows), those directions are dropped
    (eigenvalues below ``PIVOT_RTOL`` of the largest) and the result is marked for the polish
    step, which enforces them with the marginal variances.
    """
    m = A.shape[-1]
    diag = _check_rows(A, nonzero, call, allow_tiny=m > 1 and metric == "covariance")
    if m == 1:  # one row: a square root
        return _Root(A.rsqrt(), False)
    L, info = torch.linalg.cholesky_ex(A)
    ratio = L.detach().diagonal(dim1=-2, dim2=-1).square() / diag.abs()
    if not bool((info != 0).any()) and bool((ratio > PIVOT_RTOL).all()):
        eye = torch.eye(m, dtype=A.dtype, device=A.device).expand_as(A)
        R = torch.linalg.solve_triangular(L, eye, upper=False).mT
        return _Root(R, bool((ratio < POLISH_RTOL).any()))
    if metric == "euclidean":  # W = I: ill-conditioned only if the rows are dependent
        raise _dependent(call)
    lam, V = torch.linalg.eigh(A)
    keep = lam > PIVOT_RTOL * lam.amax(-1, keepdim=True)
    scale = torch.where(keep, lam.clamp_min(torch.finfo(A.dtype).tiny).rsqrt(), 0.0)
    return _Root(V * scale.unsqueeze(-2), True)


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
    G64 = G.to(F64)
    norms = G64.norm(dim=-1).clamp_min(torch.finfo(F64).tiny)  # (*gb, M)
    Gn = G64 / norms.unsqueeze(-1)
    lam, U = torch.linalg.eigh(Gn @ Gn.mT)  # (*gb, M), (*gb, M, M)
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
) -> tuple[Tensor, Tensor | None]:
    """Remove what is left of ``G mean - b`` with the metric ``diag(w)`` (or ``I``).

    Returns the corrected mean and the Cholesky factor of ``G diag(w) G^T`` (None if no
    correction was needed).
    """
    G64 = G.to(F64)
    r = _rowdot(G64, mean) - b
    P = G64.mT if w is None else w.to(F64).unsqueeze(-1) * G64.mT
    A = G64 @ P
    diag = _check_rows(A, lambda: (G64.detach() != 0).any(-1), call)
    L, info = torch.linalg.cholesky_ex(A)
    ratio = L.detach().diagonal(dim1=-2, dim2=-1).square() / diag
    if bool((info != 0).any()) or not bool((ratio > PIVOT_RTOL).all()):
        raise _dependent(call)
    step = torch.cholesky_solve(r.unsqueeze(-1), L)
    return mean - (P @ step).squeeze(-1), L


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
    >>> post = cl.functional.conserve(mu, torch.ones(1, 4), torch.tensor([8.0]), variance=var)
    >>> post.mean  # the uncertain point moves most
    tensor([0.8462, 1.8462, 1.4615, 3.8462])
    >>> float(post.mean.sum())
    8.0

    References
    ----------
    Hansen, Maddix, Alizadeh, Gupta, Mahoney. Learning Physical Models that Can Respect
    Conservation Laws. ICML 2023. arXiv:2302.11002.
    """
    call = "conserve"
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
    out = ConstrainedGaussian._make(
        mean_out, var_out, prior, solved.root, solved.G, solved.b, solved.s2, post_metric
    )
    out._P = solved.cross
    out._polish = solved.polish
    return out


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
    r = _rowdot(G64, mean.to(F64)) - b
    _check_residual(r, call)
    if metric == "euclidean":
        P = G64.mT  # (*, N, M)
    elif isinstance(prior, _Dense):
        P = prior.cross_checked(G64.mT, call)
    else:
        P = prior.cross(G64.mT)
    A = G64 @ P
    if s2 is not None:
        A = A + torch.diag_embed(s2)
    root = _inverse_root(A, lambda: (G64.detach() != 0).any(-1), metric, call)
    if root.polish and s2 is None:
        _warn_nearly_dependent(G64.detach(), mean.detach(), r.detach(), call)
    coef = _solve_with(root.R, r)
    mean_t = mean.to(F64) - (P @ coef.unsqueeze(-1)).squeeze(-1)
    var_t = None
    if metric == "covariance":
        F = P @ root.R
        var_t = prior.diag() - F.square().sum(-1)
        _check_psd(var_t, prior, call)
        var_t = var_t.clamp_min(0)
    chol2 = None
    if s2 is None and (root.polish or _inexact(mean_t, G64, b)):
        w = None if metric == "euclidean" else prior.diag()
        mean_t, chol2 = _polish(mean_t, G64, b, w, call)
    return _Solved(mean_t, var_t, root.R, G, b, s2, P, chol2)


def _check_residual(r: Tensor, call: str) -> None:
    if not bool(torch.isfinite(r.detach()).all()):
        raise ValueError(
            f"{call}: the residual G mean - b is not finite: the mean, G or b holds NaN or inf."
        )


def _check_psd(var_t: Tensor, prior: _Prior, call: str) -> None:
    if isinstance(prior, _Dense):
        v, d = var_t.detach(), prior.diag().detach()
        eps = torch.finfo(prior.S.dtype).eps
        tol = 1e3 * eps * d.abs().amax(-1, keepdim=True) + 1e-300
        if bool((v < -tol).any()):
            raise ValueError(
                f"{call}: the covariance is not positive semidefinite: conditioning made a "
                f"marginal variance negative ({float(v.min()):.3e}). Pass a valid covariance "
                "(e.g. add jitter to its diagonal)."
            )


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


# ------------------------------------------------------------------------------ posterior
class ConstrainedGaussian:
    """A Gaussian conditioned on linear constraints, kept in structured form.

    The covariance is ``Sigma - F F^T`` (``Sigma`` as given, ``F`` of shape (*batch, N, M),
    computed on first use); for the Euclidean metric it is ``Sigma`` itself (HardC moves only the
    mean). Nothing ``N x N`` is formed unless :meth:`covariance` is called.

    Attributes
    ----------
    mean : Tensor
        shape: (*batch, N); satisfies ``G mean = b`` to rounding when ``noise = 0``.
    variance : Tensor or None
        shape: (*batch, N); marginal posterior variances (None for a deterministic input).
    metric : str
        ``"covariance"`` or ``"euclidean"``.
    """

    mean: Tensor
    variance: Tensor | None
    metric: str

    @classmethod
    def _make(cls, mean, variance, prior, root, G, b, s2, metric) -> ConstrainedGaussian:
        self = cls.__new__(cls)
        self.mean, self.variance, self.metric = mean, variance, metric
        self._prior, self._R, self._G, self._b, self._s2 = prior, root, G, b, s2
        self._F = None
        self._P = None  # W G^T, when the solve formed it
        self._polish = None  # Cholesky factor of G diag(w) G^T when the polish step ran
        self._dens = None  # DegenerateGaussian, built on the first log_prob / entropy
        return self

    def __repr__(self) -> str:
        var = "None" if self.variance is None else "tensor"
        return (
            f"ConstrainedGaussian(mean: {tuple(self.mean.shape)} {self.mean.dtype}, variance: "
            f"{var}, rows: {self._G.shape[-2]}, metric={self.metric!r})"
        )

    @property
    def num_constraints(self) -> int:
        return int(self._G.shape[-2])

    def _cross(self) -> Tensor:  # W G^T: (*, N, M) float64
        if self._P is not None:
            return self._P
        G64 = self._G.to(F64)
        if self.metric == "euclidean":
            return G64.mT
        return self._prior.cross(G64.mT)

    @property
    def factor(self) -> Tensor | None:
        """``F`` with posterior covariance ``Sigma - F F^T``; shape (*batch, N, M), float64.

        None for the Euclidean metric (the covariance is not changed) or without constraints.
        """
        if self.metric == "euclidean" or self._R is None:
            return None
        if self._F is None:
            self._F = self._cross() @ self._R
        return self._F

    def covariance(self) -> Tensor:
        """The dense posterior covariance; shape (*batch, N, N), in the mean's dtype.

        Raises
        ------
        ValueError
            The input was deterministic (no covariance to return).
        """
        if self._prior is None:
            raise ValueError(
                "ConstrainedGaussian.covariance: the input had no uncertainty (a deterministic "
                "mean projected in the Euclidean metric); there is no covariance."
            )
        S = self._prior.dense()
        F = self.factor
        if F is not None:
            S = S - F @ F.mT
        batch = self.mean.shape[:-1]
        return S.expand(*batch, *S.shape[-2:]).to(self.mean.dtype)

    def _gain(self, v: Tensor) -> Tensor:
        """``W G^T A^{-1} v`` for v (..., *batch, M): (..., *batch, N), float64."""
        w = _solve_with(self._R, v)
        return (self._cross() @ w.unsqueeze(-1)).squeeze(-1)

    def _polished(self, x: Tensor) -> Tensor:
        """The exactness correction of an ill-conditioned system, applied to samples (float64)."""
        if self._polish is None:
            return x
        G64 = self._G.to(F64)
        w = None if self.metric == "euclidean" else self._prior.diag()
        P = G64.mT if w is None else w.unsqueeze(-1) * G64.mT
        r = _rowdot(G64, x) - self._b
        step = torch.cholesky_solve(r.unsqueeze(-1), self._polish)
        return x - (P @ step).squeeze(-1)

    def condition(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Apply the constraint update to samples of the unconstrained Gaussian.

        ``x~ = x - W G^T A^{-1} (G x + noise * eps - b)``: samples ``x ~ N(mu, Sigma)`` become
        samples of the posterior (Matheron's rule); no factorisation of the singular posterior
        covariance is needed. For the Euclidean metric this is the HardC projection of each
        sample.

        Parameters
        ----------
        x : Tensor
            shape: (..., *batch, N).

        Returns
        -------
        Tensor
            shape: (..., *batch, N), the dtype of ``x``.
        """
        if self._R is None:
            return x
        x64 = x.to(F64)
        v = _rowdot(self._G.to(F64), x64) - self._b
        if self._s2 is not None:
            eps = torch.randn(v.shape, dtype=F64, device=v.device, generator=generator)
            v = v + self._s2.sqrt() * eps
        return self._polished(x64 - self._gain(v)).to(x.dtype)

    def sample(
        self, sample_shape: int | Sequence[int] = (), generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw samples of the posterior, ``N(mean, covariance())``, without a Cholesky factor of
        the (singular) posterior covariance.

        Parameters
        ----------
        sample_shape : int or sequence of int
        generator : torch.Generator, optional

        Returns
        -------
        Tensor
            shape: (*sample_shape, *batch, N), in the mean's dtype.

        Examples
        --------
        >>> import torch, constraint_layers as cl
        >>> ones = torch.ones(5)
        >>> post = cl.functional.conserve(torch.zeros(5), ones, 1.0, variance=ones)
        >>> s = post.sample(3, generator=torch.Generator().manual_seed(0))
        >>> s.shape, bool(torch.allclose(s.sum(-1), torch.ones(3)))
        (torch.Size([3, 5]), True)
        """
        if self._prior is None:
            raise ValueError(
                "ConstrainedGaussian.sample: the input had no uncertainty (a deterministic mean); "
                "there is nothing to sample."
            )
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        batch = self.mean.shape[:-1]
        e = self._prior.draw((*shape, *batch), self.mean.shape[-1], generator)
        if self.metric == "covariance" and self._R is not None:
            v = _rowdot(self._G.to(F64), e)
            if self._s2 is not None:
                v = v + self._s2.sqrt() * torch.randn(
                    v.shape, dtype=F64, device=v.device, generator=generator
                )
            e = e - self._gain(v)
            if self._polish is not None:  # keep every sample exact
                x = self._polished(self.mean.to(F64) + e)
                return x.to(self.mean.dtype)
        return (self.mean.to(F64) + e).to(self.mean.dtype)

    @property
    def noise_free(self) -> bool:
        """Whether the constraints hold exactly (no constraint noise): the posterior is then a
        degenerate Gaussian supported on ``G u = b``."""
        return self._s2 is None and self._R is not None and self.metric == "covariance"

    def exact_root(self, root: Tensor) -> Tensor:
        """A root of the posterior covariance built from a root of the prior's.

        With ``L L^T = Sigma`` and ``P = I - Sigma G^T A^+ G``, the posterior covariance is
        ``P Sigma P^T`` (noise-free), so ``P L`` is a root of it, and ``G P L = 0`` holds to
        rounding whatever ``L`` is: samples ``mean + P L eps`` satisfy ``G u = b`` even when ``L``
        is a jittered (or low-rank) root of ``Sigma``. With constraint noise the root gains
        ``M`` columns, ``Sigma G^T A^{-1} diag(noise)``. The Euclidean metric leaves the
        covariance as given (the root comes back unchanged).

        Parameters
        ----------
        root : Tensor
            shape: (*batch, N, K), ``root @ root.mT`` approximating the prior covariance.

        Returns
        -------
        Tensor
            shape: (*batch, N, K) (or (*batch, N, K + M) with constraint noise), float64.
        """
        X = root.to(F64)
        if self.metric == "euclidean" or self._R is None:
            return X
        G64 = self._G.to(F64)
        cross = self._cross()
        X = X - cross @ (self._R @ (self._R.mT @ (G64 @ X)))
        if self._polish is not None:  # directions the pseudo-inverse dropped
            P = self._prior.diag().unsqueeze(-1) * G64.mT
            X = X - P @ torch.cholesky_solve(G64 @ X, self._polish)
        if self._s2 is not None:
            noise = cross @ (self._R @ (self._R.mT * self._s2.sqrt().unsqueeze(-2)))
            X = torch.cat([X, noise.expand(*X.shape[:-1], noise.shape[-1])], dim=-1)
        return X

    def _density(self) -> DegenerateGaussian:
        if self._dens is None:
            if self._prior is None:
                raise ValueError(
                    "ConstrainedGaussian.log_prob: the input had no uncertainty (a deterministic "
                    "mean); there is no density."
                )
            S = self._prior.dense()  # float64
            F = self.factor
            if F is not None:
                S = S - F @ F.mT
            S = S.expand(*self.mean.shape[:-1], *S.shape[-2:])
            rows = (self._G, self._b) if self.noise_free else None
            self._dens = DegenerateGaussian(self.mean, S, rows=rows, dtype=self.mean.dtype)
        return self._dens

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density of the posterior at ``x``.

        Without constraint noise the posterior is degenerate: it lives on the affine subspace
        ``G u = b``. The density is taken there (with respect to the surface measure of the
        subspace): the pseudo-determinant and pseudo-inverse of the posterior covariance in
        float64, ``-inf`` where ``G x = b`` misses by more than rounding. See
        :class:`DegenerateGaussian`. With constraint noise it is the ordinary density.

        Parameters
        ----------
        x : Tensor
            shape: (..., *batch, N).

        Returns
        -------
        Tensor
            shape: (..., *batch), in the promoted dtype of ``x`` and the mean.
        """
        return self._density().log_prob(x)

    def entropy(self) -> Tensor:
        """Differential entropy on the support (see :meth:`log_prob`); shape (*batch,)."""
        return self._density().entropy()


#: Eigenvalues below this fraction of the largest are numerically zero, by the covariance's dtype
#: (the cutoffs of ``scipy.stats.multivariate_normal(allow_singular=True)``).
RANK_RCOND = {torch.float64: 1e6 * 2.220446049250313e-16, torch.float32: 1e3 * 1.1920929e-07}
#: Relative residual ``|G x - b| / (|G| |x| + |b|)`` still read as on the constraint set.
SUPPORT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}


class DegenerateGaussian:
    """A Gaussian whose covariance may be singular: density on its support.

    The covariance is eigendecomposed once in float64; eigenvalues below ``RANK_RCOND`` (by the
    covariance's dtype) times the largest are zero. The log density is that of the Gaussian on
    the subspace the remaining ``k`` eigenvectors span (through the mean),
    ``-(k log 2 pi + log pdet + d^T Sigma^+ d) / 2``, the convention of
    ``scipy.stats.multivariate_normal(allow_singular=True)``; it does not depend on any jitter.
    With ``rows = (G, b)`` (a posterior conditioned exactly on ``G u = b``) points that miss the
    rows by more than rounding (``SUPPORT_RTOL``) get ``-inf``; when the covariance is otherwise
    non-singular, ``k = N - M`` and this is the density on the constraint set. Components along
    other numerically null directions (where the model itself leaves no measurable variance) are
    left out, as a pseudo-inverse does.

    Parameters
    ----------
    mean : Tensor
        shape: (*batch, N).
    covariance : Tensor
        shape: (*batch, N, N), symmetric positive semidefinite.
    rows : tuple of Tensor, optional
        ``(G, b)``: shapes (*batch, M, N) (or (M, N)) and (*batch, M).
    dtype : torch.dtype, optional
        The precision the covariance was computed in (default: its dtype): sets the rank cutoff.
    """

    def __init__(
        self,
        mean: Tensor,
        covariance: Tensor,
        rows: tuple[Tensor, Tensor] | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.mean = mean
        self.dtype = mean.dtype
        source = covariance.dtype if dtype is None else dtype
        cov = covariance.to(F64)
        cov = 0.5 * (cov + cov.mT)
        lam, V = torch.linalg.eigh(cov)
        rcond = RANK_RCOND.get(source, 1e3 * torch.finfo(source).eps)
        cut = rcond * lam.detach().abs().amax(-1, keepdim=True)
        self.keep = lam.detach() > cut  # (*batch, N)
        safe = torch.where(self.keep, lam, torch.ones_like(lam))
        self.inv_sqrt = torch.where(self.keep, safe.rsqrt(), torch.zeros_like(lam))
        self.V = V
        self.rank = self.keep.sum(-1)  # (*batch,)
        self.log_pdet = torch.where(self.keep, safe.log(), torch.zeros_like(lam)).sum(-1)
        self.rows = None if rows is None else (rows[0].to(F64), rows[1].to(F64))

    def log_prob(self, x: Tensor) -> Tensor:
        """shape: x (..., *batch, N) -> (..., *batch)."""
        out_dtype = torch.promote_types(x.dtype, self.dtype)
        d = x.to(F64) - self.mean.to(F64)
        z = (d.unsqueeze(-2) @ self.V).squeeze(-2) * self.inv_sqrt
        quad = z.square().sum(-1)
        res = -0.5 * (self.rank * math.log(2 * math.pi) + self.log_pdet + quad)
        if self.rows is not None:
            G, b = self.rows
            x64 = x.to(F64)
            gap = (_rowdot(G, x64) - b).abs()
            scale = _rowdot(G.abs(), x64.abs()) + b.abs()
            tol = max(SUPPORT_RTOL.get(x.dtype, 1e-3), SUPPORT_RTOL.get(self.dtype, 1e-3))
            off = (gap.detach() > tol * scale.detach() + torch.finfo(F64).tiny).any(-1)
            res = torch.where(off, torch.full_like(res, -math.inf), res)
        return res.to(out_dtype)

    def entropy(self) -> Tensor:
        """shape: (*batch,)."""
        h = 0.5 * (self.rank * (1 + math.log(2 * math.pi)) + self.log_pdet)
        return h.to(self.dtype)


# -------------------------------------------------------------------------------- mixtures
class MixtureMoments(NamedTuple):
    """Moments of an equal-weight mixture of Gaussians."""

    mean: Tensor  # shape: (*batch, N)
    variance: Tensor | None  # shape: (*batch, N): mean of variances + variance of means
    covariance: Tensor | None  # shape: (*batch, N, N), when accumulated
    count: int


class RunningMoments:
    """Moment matching of an equal-weight mixture with running sums (Welford, float64).

    ``mean = average of the means``; ``variance = average of the variances + population variance
    of the means``; optionally the dense covariance ``average of the covariances + population
    covariance of the means``. Only sums are held, never all members.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers.functional import RunningMoments
    >>> acc = RunningMoments()
    >>> acc.add(torch.tensor([0.0]), torch.tensor([1.0]))
    >>> acc.add(torch.tensor([2.0]), torch.tensor([1.0]))
    >>> acc.result().mean.tolist(), acc.result().variance.tolist()
    ([1.0], [2.0])
    """

    def __init__(self, *, covariance: bool = False) -> None:
        self.count = 0
        self._full = covariance
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None  # sum of squared deviations of the means
        self._var: Tensor | None = None  # sum of the variances
        self._cov: Tensor | None = None  # sum of covariances + outer deviations
        self._dtype: torch.dtype | None = None
        self._has_var = True

    def add(
        self, mean: Tensor, variance: Tensor | None = None, covariance: Tensor | None = None
    ) -> None:
        """Add one member: ``mean`` (*batch, N), ``variance`` (*batch, N) or None (a point
        mass), ``covariance`` (*batch, N, N) when the dense mixture covariance is accumulated."""
        if self._full and covariance is None and variance is not None:
            raise ValueError(
                "RunningMoments.add: accumulating the covariance needs each member's covariance "
                "(pass covariance=post.covariance())."
            )
        x = mean.to(F64)
        self.count += 1
        k = self.count
        if self._mean is None:
            self._dtype = mean.dtype
            self._mean = x.clone()
            self._m2 = torch.zeros_like(x)
            self._has_var = variance is not None
            self._var = None if variance is None else variance.to(F64).clone()
            if self._full:
                cov = torch.zeros((*x.shape, x.shape[-1]), dtype=F64, device=x.device)
                self._cov = cov if covariance is None else cov + covariance.to(F64)
            return
        if (variance is not None) != self._has_var:
            raise ValueError(
                "RunningMoments.add: every member must give a variance, or none (point masses)."
            )
        delta = x - self._mean
        self._mean = self._mean + delta / k
        after = x - self._mean
        self._m2 = self._m2 + delta * after
        if variance is not None:
            self._var = self._var + variance.to(F64)
        if self._full:
            outer = delta.unsqueeze(-1) * after.unsqueeze(-2)
            self._cov = self._cov + outer + (0 if covariance is None else covariance.to(F64))

    def result(self) -> MixtureMoments:
        """The moment-matched Gaussian (in the first member's dtype)."""
        if not self.count:
            raise ValueError("RunningMoments.result: no member was added.")
        k, dt = self.count, self._dtype
        var = self._m2 / k
        if self._var is not None:
            var = var + self._var / k
        cov = None
        if self._full:
            cov = self._cov / k
            cov = (0.5 * (cov + cov.mT)).to(dt)
        return MixtureMoments(self._mean.to(dt), var.to(dt), cov, k)


def conserve_mixture(
    means: Tensor | Iterable[Tensor],
    G: Tensor,
    b: float | Tensor = 0.0,
    *,
    variances: Tensor | Iterable[Tensor] | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
    dim: int = 0,
    covariance: bool = False,
) -> MixtureMoments:
    """Condition each member of an equal-weight Gaussian mixture, then moment-match.

    For several samples of one model (latent samples of a neural process, ensemble members,
    MC-dropout passes): each member ``N(mean_s, diag(variance_s))`` is conditioned on ``G u = b``
    (:func:`conserve`), and the conditioned members are moment-matched with running sums. The
    mixture mean satisfies ``G mean = b`` exactly (an average of exact means).

    Parameters
    ----------
    means : Tensor or iterable of Tensor
        shape: (S, *batch, N) with the members along ``dim``, or an iterable of (*batch, N).
    G, b, noise, metric
        As for :func:`conserve`.
    variances : Tensor or iterable of Tensor, optional
        Like ``means``; None: deterministic members (Euclidean projection each).
    dim : int, default 0
        The members' axis when ``means`` is a tensor.
    covariance : bool, default False
        Also accumulate the dense ``(*batch, N, N)`` mixture covariance (average of the members'
        conditioned covariances plus the covariance of their means).

    Returns
    -------
    MixtureMoments
        ``mean``, ``variance`` (shape (*batch, N)), ``covariance`` or None, ``count``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> means = torch.randn(10, 4, 32)  # 10 latent samples, 4 functions, 32 points
    >>> mix = cl.functional.conserve_mixture(
    ...     means, torch.ones(32) / 32, 0.0, variances=torch.rand(10, 4, 32) + 0.1)
    >>> bool(mix.mean.mean(-1).abs().max() < 1e-6), mix.count
    (True, 10)
    """
    if isinstance(means, Tensor):
        means = means.unbind(dim)
    if variances is None:
        variances = [None] * len(means) if isinstance(means, (list, tuple)) else None
    elif isinstance(variances, Tensor):
        variances = variances.unbind(dim)
    acc = RunningMoments(covariance=covariance)
    pairs = zip(means, variances) if variances is not None else ((m, None) for m in means)
    for mu, var in pairs:
        post = conserve(mu, G, b, variance=var, noise=noise, metric=metric)
        cov = post.covariance() if covariance and var is not None else None
        acc.add(post.mean, post.variance if var is not None else None, cov)
    return acc.result()
