"""gpytorch / linear_operator pieces of the gpytorch adapter (private).

- :class:`ConditionedCovariance`: the posterior covariance ``Sigma - F F^T`` kept lazy, whose
  ``root_decomposition`` is the exact conditioned root ``P L`` (``L`` a root of the model's own
  covariance, ``P = I - Sigma G^T A^+ G``): gpytorch's ``sample`` / ``rsample`` (and every other
  caller of ``root_decomposition``) then draw samples that satisfy ``G u = b`` to rounding.
- :class:`TaskMajor`: a multitask covariance in interleaved order read in task-major order.
- :class:`ConstrainedMultivariateNormal` and :class:`ConstrainedMultitaskMultivariateNormal`:
  subclasses of gpytorch's distributions whose ``log_prob`` / ``entropy`` are those of the
  degenerate posterior (density on the constraint set) when the constraints hold exactly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator import to_linear_operator
from linear_operator.operators import (
    DenseLinearOperator,
    LinearOperator,
    LowRankRootLinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
    SumLinearOperator,
)
from linear_operator.utils.memoize import cached
from torch import Tensor

from constraint_layers.conservation.linalg import sparse_rows

__all__ = [
    "ConditionedCovariance",
    "ConstrainedMultitaskMultivariateNormal",
    "ConstrainedMultivariateNormal",
    "SparseCrossSum",
    "TaskMajor",
    "conditioned_covariance",
    "constrained_type",
    "sparse_cross",
]


class ConditionedCovariance(SumLinearOperator):
    """``Sigma - F F^T`` (lazy), with an exact root for sampling.

    Built by :func:`conditioned_covariance`. Every product, diagonal and slice is that of the
    sum (``SumLinearOperator``); only :meth:`root_decomposition` differs: it is computed from
    the model's own root, projected onto the constraint set. Operations that rebuild the operator
    (``.to``, ``.detach``, batch expansion) give a plain sum again (``_exact_root`` is not
    carried over), which samples as gpytorch does (a jittered Cholesky factor).
    """

    #: Callable ``method -> root`` (shape (*batch, N, K)), or None: the sum's own root.
    _exact_root: Callable[[str | None], Tensor] | None = None
    #: The marginal variances the conditioning already computed (shape (*batch, N)), or None.
    _variance: Tensor | None = None

    def _diagonal(self) -> Tensor:
        if self._variance is not None:
            return self._variance
        return super()._diagonal()

    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        if self._exact_root is None:
            return super().root_decomposition(method=method)
        return RootLinearOperator(self._exact_root(method))


def conditioned_covariance(
    base: LinearOperator,  # shape: (*batch, N, N), the model's covariance
    downdate: Tensor,  # shape: (*batch, N, M), posterior covariance base - F F^T
    conditioned: Any = None,  # ConstrainedGaussian over the same flat layout, or None
    variance: Tensor | None = None,  # shape: (*batch, N), its diagonal when already known
) -> LinearOperator:
    """The lazy posterior covariance; with ``conditioned`` (noise-free) its root is exact."""
    base = to_linear_operator(base)  # a tensor when the conditioning evaluated it (CG posteriors)
    F = downdate.to(dtype=base.dtype, device=base.device)
    op = ConditionedCovariance(base, LowRankRootLinearOperator(F).mul(-1.0))
    if variance is not None and variance.shape == op.shape[:-1]:
        op._variance = variance.to(base.dtype)
    if conditioned is not None and conditioned.noise_free:
        dtype = base.dtype

        def exact_root(method: str | None) -> Tensor:
            # the root over the eigenvalues log_prob keeps (one rank cutoff for both), projected
            # onto G u = b; not the model's jittered root, whose samples log_prob reads as far off
            return conditioned.sampling_root().to(dtype)

        op._exact_root = exact_root
    return op


class SparseCrossSum(SumLinearOperator):
    """gpytorch's posterior covariance (a sum of operators) with a faster product by sparse
    right-hand sides.

    The conditioning multiplies the covariance by ``G^T`` (shape (N, M)); for integral rows
    each column has about ``N / M`` non-zeros. A dense ``N x N`` part (gpytorch's evaluated
    test-test kernel) is then multiplied as ``(G K)^T`` with ``G`` in compressed sparse rows
    (``O(N^2)`` instead of ``O(N^2 M)``; the part is symmetric). Other parts and dense
    right-hand sides use their own products; gradients are the sum's (its components'
    ``_bilinear_derivative``), untouched.
    """

    def _matmul(self, rhs: Tensor) -> Tensor:
        if rhs.ndim != 2 or rhs.shape[-1] < 4 or rhs.layout != torch.strided:
            return super()._matmul(rhs)
        rows = sparse_rows(rhs.mT)  # G: (M, N), its CSR form cached across calls
        if rows is None:
            return super()._matmul(rhs)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            return sum(_times_sparse(op, rhs, rows.csr) for op in self.linear_ops)


def _times_sparse(op: LinearOperator, rhs: Tensor, sparse: Tensor) -> Tensor:
    """``op @ rhs`` with ``rhs`` (N, M) mostly zeros and ``sparse = rhs^T`` in CSR form."""
    if isinstance(op, DenseLinearOperator) and op.tensor.ndim == 2:
        K = op.tensor
        if K.shape[-1] == K.shape[-2]:  # a covariance block, symmetric: K G^T = (G K)^T
            return torch.sparse.mm(sparse, K).mT
        return torch.sparse.mm(sparse, K.mT).mT
    if isinstance(op, MatmulLinearOperator):  # left @ (right @ G^T): the narrow product first
        right = _times_sparse(op.right_linear_op, rhs, sparse)
        return op.left_linear_op._matmul(right)
    return op._matmul(rhs)


def sparse_cross(cov: LinearOperator) -> LinearOperator:
    """``cov`` as a :class:`SparseCrossSum` when it is a plain sum of operators."""
    if type(cov) is SumLinearOperator:
        return SparseCrossSum(*cov.linear_ops)
    return cov


class TaskMajor(LinearOperator):
    """An interleaved multitask covariance (point-major: index ``i * T + t``) read in task-major
    order (index ``t * n + i``), lazily: products permute the right-hand side."""

    def __init__(self, base: LinearOperator, num_points: int, num_tasks: int) -> None:
        super().__init__(base, num_points=num_points, num_tasks=num_tasks)
        self.base = base
        self.num_points, self.num_tasks = int(num_points), int(num_tasks)
        n, t = self.num_points, self.num_tasks
        # task-major position j = t * n + i holds interleaved position i * T + t
        self._perm = torch.arange(n * t, device=base.device).reshape(n, t).mT.reshape(-1)
        self._inv = torch.argsort(self._perm)

    def _matmul(self, rhs: Tensor) -> Tensor:  # rhs: (*batch, n T, C)
        return self.base._matmul(rhs[..., self._inv, :])[..., self._perm, :]

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._matmul(rhs)  # symmetric

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self) -> LinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return self.base._diagonal()[..., self._perm]

    def _expand_batch(self, batch_shape: torch.Size) -> LinearOperator:
        return TaskMajor(self.base._expand_batch(batch_shape), self.num_points, self.num_tasks)

    def _get_indices(self, row_index, col_index, *batch_indices) -> Tensor:
        return self.base._get_indices(self._perm[row_index], self._perm[col_index], *batch_indices)

    def to_dense(self) -> Tensor:
        dense = self.base.to_dense()
        return dense[..., self._perm, :][..., :, self._perm]

    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        root = self.base.root_decomposition(method=method).root
        root = root.to_dense() if isinstance(root, LinearOperator) else root
        return RootLinearOperator(root[..., self._perm, :])


class _ConstrainedDistribution:
    """The degenerate density of an exactly constrained posterior (mixin, before the gpytorch
    class in the MRO). Instances made by gpytorch itself (``likelihood(f)``, slicing, ``expand``)
    carry no constraint and behave as the parent class."""

    #: The ConstrainedGaussian (or DegenerateGaussian) over the flat layout, or None.
    _conditioned: Any = None

    def _flat(self, value: Tensor) -> Tensor:
        return value

    def log_prob(self, value: Tensor) -> Tensor:
        """Log density. Exactly constrained posteriors (no constraint noise): the density on the
        constraint set ``G u = b`` (pseudo-determinant on that subspace, float64, independent of
        any jitter setting), ``-inf`` off it beyond rounding. Otherwise gpytorch's own."""
        cg = self._conditioned
        if cg is None or not getattr(cg, "noise_free", True):
            return super().log_prob(value)
        return cg.log_prob(self._flat(value)).to(torch.promote_types(value.dtype, self.loc.dtype))

    def entropy(self) -> Tensor:
        """Differential entropy; on the constraint set for exactly constrained posteriors."""
        cg = self._conditioned
        if cg is None or not getattr(cg, "noise_free", True):
            return super().entropy()
        return cg.entropy().to(self.loc.dtype)


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


class ConstrainedMultitaskMultivariateNormal(_ConstrainedDistribution, MultitaskMultivariateNormal):
    """A ``MultitaskMultivariateNormal`` conditioned exactly on ``G u = b`` (task-major flat
    layout ``(tasks, points)``); see :class:`ConstrainedMultivariateNormal`."""

    def _flat(self, value: Tensor) -> Tensor:  # (..., n, T) -> (..., T n)
        return value.mT.reshape(*value.shape[:-2], -1)


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
    from linear_operator.operators import DenseLinearOperator

    from constraint_layers.functional import DegenerateGaussian

    from .ensemble import _projected_root

    dtype = mean.dtype
    op = ConditionedCovariance(DenseLinearOperator(covariance.to(dtype)))
    if rows is not None:
        op._exact_root = lambda method: _projected_root(covariance, rows).to(dtype)
    cls = constrained_type(type(like))
    out = cls(mean, op)
    if rows is not None:
        out._conditioned = DegenerateGaussian(mean, covariance, rows=rows, dtype=dtype)
    return out
