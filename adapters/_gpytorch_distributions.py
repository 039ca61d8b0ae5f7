"""gpytorch distributions of a wrapped GP (private).

- :class:`ConstrainedMultivariateNormal` and :class:`ConstrainedMultitaskMultivariateNormal`:
  subclasses of gpytorch's distributions whose ``log_prob`` / ``entropy`` are those of the
  degenerate posterior (density on the constraint set) when the constraints hold exactly, and
  whose copies (``expand``, ``* c``, ``+ c``, indexing) keep the constraint or say that they
  do not (:class:`ConstraintDroppedWarning`).
- :func:`mixture_distribution`: the moment-matched mixture of an ensemble of conditioned GPs.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator.operators import DenseLinearOperator, SumLinearOperator
from torch import Tensor

from ._gpytorch_ops import ConditionedCovariance, _density_of, _ExactRoot, _MappedRoot

__all__ = [
    "ConstrainedMultitaskMultivariateNormal",
    "ConstrainedMultivariateNormal",
    "ConstraintDroppedWarning",
    "constrained_type",
    "mixture_distribution",
]


class _Transformed:
    """The degenerate density of a copy ``u' = scale * u[..., index] + shift`` of an exactly
    constrained posterior (picklable; the eigendecomposition is the parent's, on first use)."""

    noise_free = True

    def __init__(
        self,
        parent: Any,  # ConstrainedGaussian, DegenerateGaussian or _Transformed
        scale: float = 1.0,
        shift: float = 0.0,
        index: Tensor | None = None,  # shape: (N,), a permutation of the flat positions
    ) -> None:
        self.parent, self.scale, self.shift, self.index = parent, float(scale), float(shift), index
        self._dens: Any = None

    def _density(self) -> Any:
        if self._dens is None:
            parent = _density_of(self.parent)
            shift = None
            if self.shift != 0.0:
                shift = torch.full(
                    parent.mean.shape[-1:],
                    self.shift,
                    dtype=torch.float64,
                    device=parent.mean.device,
                )
            self._dens = parent.transformed(self.scale, shift, self.index)
        return self._dens

    def log_prob(self, x: Tensor) -> Tensor:
        return self._density().log_prob(x)

    def entropy(self) -> Tensor:
        return self._density().entropy()


def _dropped(what: str, result: MultivariateNormal) -> MultivariateNormal:
    """``result`` as gpytorch's own class (no constraint), with a warning that says so."""
    plain = _PLAIN.get(type(result), type(result))
    warnings.warn(
        f"{what} of a constrained posterior (cl.wrap) no longer carries the constraint G u = b: "
        f"it is returned as a plain gpytorch {plain.__name__}, whose log_prob and "
        "samples are gpytorch's (jittered) ones for its covariance. Apply the operation to "
        "the model's output before wrapping, or keep the constrained object for densities.",
        ConstraintDroppedWarning,
        stacklevel=3,
    )
    if plain is type(result):
        return result
    cov = result.lazy_covariance_matrix
    if isinstance(cov, ConditionedCovariance):
        cov = SumLinearOperator(*cov.linear_ops)
    if issubclass(plain, MultitaskMultivariateNormal):
        return plain(result.mean, cov, interleaved=result._interleaved)
    return plain(result.mean, cov)


class ConstraintDroppedWarning(UserWarning):
    """A copy of a constrained gpytorch posterior (a subset of its nodes, added jitter, a sum
    with another Gaussian) that no longer satisfies the constraint: it comes back as gpytorch's
    plain class."""


def _event_index(idx: Any, ndim: int, n: int) -> Tensor | None:
    """The flat event positions an index of gpytorch's ``MultivariateNormal.__getitem__`` keeps,
    when it leaves the batch axes whole; None otherwise."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if len(idx) > ndim and Ellipsis in idx:
        idx = tuple(i for i in idx if i is not Ellipsis)
    whole = slice(None)
    rest, last = idx[:-1], idx[-1] if idx else whole
    if not (len(idx) == ndim or Ellipsis in rest):
        return None  # batch axes only (gpytorch's first branch)
    if not all(i is Ellipsis or (isinstance(i, slice) and i == whole) for i in rest):
        return None
    if last is Ellipsis:
        return torch.arange(n)
    try:
        pos = torch.arange(n)[last]
    except (IndexError, TypeError):
        return None
    return pos if pos.ndim == 1 else None


def _is_permutation(pos: Tensor | None, n: int) -> bool:
    return pos is not None and pos.numel() == n and torch.equal(pos.sort().values, torch.arange(n))


class _ConstrainedDistribution:
    """The degenerate density of an exactly constrained posterior (mixin, before the gpytorch
    class in the MRO). Copies keep the constraint where it still holds (``expand``, ``* c``,
    ``/ c``, ``+ c`` for numbers ``c``, indexing that keeps every node); the others (a subset of
    the nodes, ``add_jitter``, ``unsqueeze``, a sum with another Gaussian) come back as
    gpytorch's plain class with a :class:`ConstraintDroppedWarning`. Instances gpytorch makes
    otherwise (``likelihood(f)``) carry no constraint and behave as the parent class."""

    #: The ConstrainedGaussian (or DegenerateGaussian, _Transformed) over the flat layout.
    _conditioned: Any = None

    def _flat(self, value: Tensor) -> Tensor:
        return value

    @property
    def _exact(self) -> bool:
        cg = self._conditioned
        return cg is not None and getattr(cg, "noise_free", True)

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density. Exactly constrained posteriors (no constraint noise): the density on the
        constraint set ``G u = b`` (pseudo-determinant on that subspace, float64, independent of
        any jitter setting), ``-inf`` off it beyond rounding. Otherwise gpytorch's own."""
        if not self._exact:
            return super().log_prob(value)
        lp = self._conditioned.log_prob(self._flat(value))
        return lp.to(torch.promote_types(value.dtype, self.loc.dtype))

    def entropy(self) -> Tensor:
        """Differential entropy; on the constraint set for exactly constrained posteriors."""
        if not self._exact:
            return super().entropy()
        return self._conditioned.entropy().to(self.loc.dtype)

    def _keep(self, out: Any, source: Any) -> Any:
        out._conditioned = source
        return out

    def expand(self, batch_size: torch.Size) -> Any:
        out = super().expand(batch_size)
        return self._keep(out, self._conditioned)  # the density broadcasts over batch axes

    def _like(self, mean: Tensor, cov: Any) -> Any:
        return type(self)(mean, cov)

    def __add__(self, other: Any) -> Any:
        if not self._exact or not isinstance(other, (int, float, MultivariateNormal)):
            return super().__add__(other)  # gpytorch's (numbers and Gaussians only)
        if isinstance(other, MultivariateNormal):
            return _dropped("A sum with another Gaussian", super().__add__(other))
        out = self._like(self.mean + other, self.lazy_covariance_matrix)
        return self._keep(out, _Transformed(self._conditioned, shift=other))

    def __mul__(self, other: Any) -> Any:
        if not self._exact or not isinstance(other, (int, float)) or other == 1:
            return super().__mul__(other)
        out = self._like(self.mean * other, self.lazy_covariance_matrix * (other**2))
        if other == 0:
            return _dropped("A multiplication by 0", out)
        return self._keep(out, _Transformed(self._conditioned, scale=other))

    def add_jitter(self, noise: float = 1e-4) -> Any:
        out = super().add_jitter(noise)
        return _dropped("add_jitter", out) if self._exact else out

    def unsqueeze(self, dim: int) -> Any:
        out = super().unsqueeze(dim)
        return _dropped("unsqueeze", out) if self._exact else out


class ConstrainedMultivariateNormal(_ConstrainedDistribution, MultivariateNormal):
    """A ``gpytorch.distributions.MultivariateNormal`` conditioned exactly on ``G u = b``.

    Everything is the parent's (mean, variance, lazy covariance, ``confidence_region``,
    ``likelihood(...)``), except: samples satisfy the constraint to rounding (the covariance's
    root is the exact conditioned root), ``log_prob`` / ``entropy`` are those of the
    degenerate Gaussian on the constraint set, and ``variance`` is the conditioned diagonal as
    computed (exactly 0 where the constraints fix a value, such as Dirichlet nodes; rounding
    below 0 is clamped to 0) instead of gpytorch's ``min_variance`` floor and its warning.
    """

    @property
    def variance(self) -> Tensor:
        cov = self.lazy_covariance_matrix if self.islazy else None
        if isinstance(cov, ConditionedCovariance) and cov._variance is not None:
            diag = cov.diagonal(dim1=-1, dim2=-2)
            diag = diag.view(diag.shape[:-1] + self._event_shape)
            return diag.expand(self._batch_shape + self._event_shape).clamp_min(0)
        return super().variance

    def __getitem__(self, idx: Any) -> MultivariateNormal:
        out = super().__getitem__(idx)
        if not self._exact:
            return out
        n = self.loc.shape[-1]
        pos = _event_index(idx, self.loc.ndim, n)
        if not _is_permutation(pos, n):
            return _dropped(f"Indexing with {idx!r} (not every node, or batch axes)", out)
        cov = self.lazy_covariance_matrix
        if isinstance(cov, ConditionedCovariance):  # the sum, reordered, with its exact root
            new = out.lazy_covariance_matrix
            new = ConditionedCovariance(*getattr(new, "linear_ops", (new,)))
            if cov._exact_root is not None:
                new._exact_root = _MappedRoot(cov._exact_root, 1.0, pos)
            if cov._variance is not None:
                new._variance = cov._variance[..., pos]
            out = self._like(out.mean, new)
        return self._keep(out, _Transformed(self._conditioned, index=pos))


class ConstrainedMultitaskMultivariateNormal(_ConstrainedDistribution, MultitaskMultivariateNormal):
    """A ``MultitaskMultivariateNormal`` conditioned exactly on ``G u = b`` (task-major flat
    layout ``(tasks, points)``); see :class:`ConstrainedMultivariateNormal`."""

    def _flat(self, value: Tensor) -> Tensor:  # (..., n, T) -> (..., T n)
        return value.mT.reshape(*value.shape[:-2], -1)

    def expand(self, batch_size: torch.Size) -> Any:
        out = type(self)(
            self.mean.expand(*batch_size, *self.mean.shape[-2:]),
            self._covar.expand(*batch_size, *self._covar.shape[-2:]),
            interleaved=self._interleaved,
        )
        return self._keep(out, self._conditioned)

    def _like(self, mean: Tensor, cov: Any) -> Any:
        return type(self)(mean, cov, interleaved=self._interleaved)

    def __getitem__(self, idx: Any) -> MultivariateNormal:
        out = super().__getitem__(idx)
        if not self._exact:
            return out
        norm = idx if isinstance(idx, tuple) else (idx,)
        if all(i is Ellipsis or (isinstance(i, slice) and i == slice(None)) for i in norm):
            return self._keep(
                type(self)(self.mean, self.lazy_covariance_matrix, interleaved=self._interleaved),
                self._conditioned,
            )
        return _dropped(f"Indexing with {idx!r} (not every node and task)", out)


_PLAIN: dict[type, type] = {
    ConstrainedMultivariateNormal: MultivariateNormal,
    ConstrainedMultitaskMultivariateNormal: MultitaskMultivariateNormal,
}
_TYPES: dict[type, type] = {
    MultivariateNormal: ConstrainedMultivariateNormal,
    MultitaskMultivariateNormal: ConstrainedMultitaskMultivariateNormal,
    ConstrainedMultivariateNormal: ConstrainedMultivariateNormal,
    ConstrainedMultitaskMultivariateNormal: ConstrainedMultitaskMultivariateNormal,
}


def constrained_type(cls: type) -> type:
    """The constrained distribution class for a model's output class (a user's own subclass of
    a gpytorch distribution keeps its type: its samples are still exact, its ``log_prob`` is
    gpytorch's)."""
    return _TYPES.get(cls, cls)


def mixture_distribution(
    like: MultivariateNormal,
    mean: Tensor,  # shape: (*batch, N)
    covariance: Tensor,  # shape: (*batch, N, N), float64
    rows: tuple[Tensor, Tensor] | None,  # (G, b) when every member was conditioned exactly
) -> MultivariateNormal:
    """A moment-matched mixture of conditioned gpytorch posteriors, as ``like``'s type.

    The dense covariance stays a linear operator whose root is projected onto ``G u = 0`` (exact
    samples) and, with ``rows``, whose density is the one on the constraint set.
    """
    from constraint_layers.functional import DegenerateGaussian

    dtype = mean.dtype
    op = ConditionedCovariance(DenseLinearOperator(covariance.to(dtype)))
    cls = constrained_type(type(like))
    out = cls(mean, op)
    if rows is not None:
        density = DegenerateGaussian(mean, covariance, rows=rows, dtype=dtype)
        op._exact_root = _ExactRoot(density, dtype)
        out._conditioned = density
    return out
