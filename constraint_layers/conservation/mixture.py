"""Mixtures (ensembles, latent samples): condition each member, moment-match with running sums
(private; public names in ``functional``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from .._engine.gaussian import condition_gaussian
from .gaussian import (
    F64,
)

__all__ = ["MixtureMoments", "RunningMoments", "conserve_mixture"]


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
    (:func:`~constraint_layers.functional.condition_gaussian`), and the conditioned members are
    moment-matched with running sums. The mixture mean satisfies ``G mean = b`` exactly (an
    average of exact means).

    Parameters
    ----------
    means : Tensor or iterable of Tensor
        shape: (S, *batch, N) with the members along ``dim``, or an iterable of (*batch, N).
    G, b, noise, metric
        As for :func:`~constraint_layers.functional.condition_gaussian`.
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
        post = condition_gaussian(mu, G, b, variance=var, noise=noise, metric=metric)
        cov = post.covariance() if covariance and var is not None else None
        acc.add(post.mean, post.variance if var is not None else None, cov)
    return acc.result()
