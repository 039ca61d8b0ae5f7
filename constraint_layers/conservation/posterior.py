"""The conditioned Gaussian in structured form (covariance ``Sigma - F F^T``, exact sampler), and
the density of a degenerate Gaussian on the constraint set (private)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .._tolerance import SUPPORT_RTOL, rank_cutoff
from .gaussian import (
    F64,
)
from .linalg import (
    _rowdot,
    _solve_with,
    _Spectral,
    _SqrtKept,
)

__all__ = ["ConstrainedGaussian", "DegenerateGaussian"]


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

    def used_covariance(self, given):
        """The full covariance this posterior conditioned: ``given`` itself, or the jittered or
        symmetrised form the PSD policy made of an inaccurate model covariance (see
        :class:`~constraint_layers.errors.IndefiniteCovarianceWarning`). Records that return
        ``covariance - F F^T`` must use this one, for ``G (covariance - F F^T) G^T = 0``."""
        S = getattr(self._prior, "S", None)
        return given if S is None else S

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
        >>> post = cl.functional.condition_gaussian(torch.zeros(5), ones, 1.0, variance=ones)
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

    def sampling_root(self) -> Tensor:
        """A root of the posterior covariance that agrees with :meth:`log_prob`: the symmetric
        root over the eigenvalues the density keeps (:meth:`DegenerateGaussian.root`, one rank
        cutoff for both), projected by :meth:`exact_root` so that ``G u = b`` holds to rounding.
        Unlike a root built from the model's own (jittered) root, its samples carry no variance
        in the directions the density reads as null. Shape (*batch, N, N), float64; O(N^3) once
        (the density's eigendecomposition, shared with ``log_prob``)."""
        return self.exact_root(self._density().root())

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


class DegenerateGaussian:
    """A Gaussian whose covariance may be singular: density on its support, and the root its
    samples come from.

    The covariance is eigendecomposed once in float64; eigenvalues at or below
    :func:`~constraint_layers._tolerance.rank_cutoff` (by the dtype the covariance was computed
    in, its largest eigenvalue and its order) are zero. The log density is that of the Gaussian on
    the subspace the remaining ``k`` eigenvectors span (through the mean),
    ``-(k log 2 pi + log pdet + d^T Sigma^+ d) / 2``, the convention of
    ``scipy.stats.multivariate_normal(allow_singular=True)``; it does not depend on any jitter.
    With ``rows = (G, b)`` (a posterior conditioned exactly on ``G u = b``) points that miss the
    rows by more than rounding (``SUPPORT_RTOL``) get ``-inf``; when the covariance is otherwise
    non-singular, ``k = N - M`` and this is the density on the constraint set. Components along
    other numerically null directions (where the model itself leaves no measurable variance) are
    left out, as a pseudo-inverse does. :meth:`root` spans the same ``k`` directions with the
    same eigenvalues (one rank cutoff), so the density of the samples it gives is the density
    this object evaluates.

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
        # (Sigma^+)^{1/2}, log pdet and the kept eigenvalues from one eigendecomposition, with a
        # backward that is finite for repeated eigenvalues (the M-fold zero of the support); the
        # one rank cutoff (relative to the largest eigenvalue), shared with :meth:`root`
        rcond = rank_cutoff(source, 1.0, cov.shape[-1])
        self.R, self.log_pdet, self.keep, self._cut = _Spectral.apply(cov, None, rcond)
        self.rank = self.keep.sum(-1)  # (*batch,)
        self._cov = cov
        self.rows = None if rows is None else (rows[0].to(F64), rows[1].to(F64))

    def root(self) -> Tensor:
        """The symmetric root of the covariance over the eigenvalues :meth:`log_prob` keeps (one
        rank cutoff for samples and density), projected onto ``G u = 0`` with ``rows`` so that
        samples ``mean + X eps`` satisfy the rows to rounding. A spectral function with a finite
        backward at repeated eigenvalues (Daleckii-Krein). Shape (*batch, N, N), float64."""
        X = _SqrtKept.apply(self._cov, self._cut, 0.0)
        if self.rows is not None:
            G = self.rows[0]
            X = X - torch.linalg.pinv(G) @ (G @ X)
        return X

    def transformed(
        self, scale: float = 1.0, shift: Tensor | None = None, index: Tensor | None = None
    ) -> DegenerateGaussian:
        """The Gaussian of ``u' = scale * u[..., index] + shift`` (``index`` a permutation of the
        ``N`` positions; ``scale`` non-zero), from the same eigendecomposition: the spectral
        functions transform as ``R' = R[index][:, index] / |scale|``.

        The rows become ``G' = G[..., index]``, ``b' = scale * b + G' shift``.
        """
        out = DegenerateGaussian.__new__(DegenerateGaussian)
        out.__dict__.update(self.__dict__)
        s2 = float(scale) ** 2
        mean, R, cov = self.mean, self.R, self._cov
        if index is not None:
            mean = mean[..., index]
            R = R[..., index, :][..., :, index]
            cov = cov[..., index, :][..., :, index]
        mean = mean * scale
        if shift is not None:
            mean = mean + shift.to(mean.dtype)
        out.mean, out.R, out._cov = mean, R / abs(float(scale)), cov * s2
        out._cut = self._cut * s2
        out.log_pdet = self.log_pdet + self.rank * math.log(s2)
        if self.rows is not None:
            G, b = self.rows
            G = G if index is None else G[..., index]
            b = b * scale
            if shift is not None:
                b = b + _rowdot(G, shift.to(F64))
            out.rows = (G, b)
        return out

    def log_prob(self, x: Tensor) -> Tensor:
        """shape: x (..., *batch, N) -> (..., *batch)."""
        out_dtype = torch.promote_types(x.dtype, self.dtype)
        d = x.to(F64) - self.mean.to(F64)
        quad = (d.unsqueeze(-2) @ self.R).squeeze(-2).square().sum(-1)
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
