"""gpytorch / linear_operator pieces of the gpytorch adapter (private).

- :class:`ConditionedCovariance`: the posterior covariance ``Sigma - F F^T`` kept lazy, whose
  ``root_decomposition`` is an exact root (:class:`_ExactRoot`): gpytorch's ``sample`` /
  ``rsample`` (and every other caller of ``root_decomposition``) then draw samples that satisfy
  ``G u = b`` to rounding.
- :class:`TaskMajor`: a multitask covariance in interleaved order read in task-major order.
- :class:`SparseCrossSum`: gpytorch's posterior covariance with a sparse product by ``G^T``.

The distributions built on them are in ``_gpytorch_distributions.py``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from linear_operator import settings as lo_settings
from linear_operator import to_linear_operator
from linear_operator.operators import (
    DenseLinearOperator,
    LinearOperator,
    LowRankRootLinearOperator,
    MatmulLinearOperator,
    RootLinearOperator,
    SumLinearOperator,
)
from linear_operator.utils.memoize import _is_in_cache_ignore_args, cached
from torch import Tensor

from constraint_layers.conservation.linalg import sparse_rows

__all__ = [
    "ConditionedCovariance",
    "SparseCrossSum",
    "TaskMajor",
    "conditioned_covariance",
    "interleaved",
    "sparse_cross",
]


def _density_of(source: Any) -> Any:
    """The :class:`DegenerateGaussian` of a ConstrainedGaussian, a transformed copy, or itself."""
    return source._density() if hasattr(source, "_density") else source


class _ExactRoot:
    """The exact root of a noise-free conditioned covariance (a picklable callable
    ``method -> root``, shape (*batch, N, K), in the operator's dtype and layout).

    - Dense sizes (``N <= gpytorch.settings.max_cholesky_size``, any method but ``"lanczos"``):
      the root over the numerical rank of the dense posterior covariance, from the very
      eigendecomposition and rank cutoff :meth:`log_prob` uses (so that the density of the
      object's own samples is the density it evaluates), projected onto ``G u = 0``.
    - Otherwise (and for ``method="lanczos"``) with ``base``: the model's own root of ``base``
      (gpytorch's choice of method) projected onto the constraint set,
      :meth:`ConstrainedGaussian.exact_root`.

    ``perm`` (shape (N,)): row ``i`` of the operator's layout is row ``perm[i]`` of the
    source's (multitask: interleaved from task-major).
    """

    def __init__(
        self,
        source: Any,  # ConstrainedGaussian, DegenerateGaussian or _Transformed (flat layout)
        dtype: torch.dtype,
        base: LinearOperator | None = None,  # shape: (*batch, N, N), the model's, source layout
        perm: Tensor | None = None,  # shape: (N,)
    ) -> None:
        self.source, self.dtype, self.base, self.perm = source, dtype, base, perm

    def __call__(self, method: str | None) -> Tensor:
        n = self.base.shape[-1] if self.base is not None else None
        dense = n is None or (method != "lanczos" and n <= lo_settings.max_cholesky_size.value())
        if dense:
            X = _density_of(self.source).root()
        else:
            root = self.base.root_decomposition(method=method).root
            root = root.to_dense() if isinstance(root, LinearOperator) else root
            X = self.source.exact_root(root)
        if self.perm is not None:
            X = X[..., self.perm, :]
        return X.to(self.dtype)


class _MappedRoot:
    """The root of a copy: ``factor * parent(method)[..., index, :]`` (picklable)."""

    def __init__(self, parent: Any, factor: float = 1.0, index: Tensor | None = None) -> None:
        self.parent, self.factor, self.index = parent, float(factor), index

    def __call__(self, method: str | None) -> Tensor:
        X = self.parent(method)
        if self.index is not None:
            X = X[..., self.index, :]
        return X * self.factor if self.factor != 1.0 else X


class ConditionedCovariance(SumLinearOperator):
    """``Sigma - F F^T`` (lazy), with an exact root for sampling.

    Built by :func:`conditioned_covariance`. Every product, diagonal and slice is that of the
    sum (``SumLinearOperator``); only :meth:`root_decomposition` differs: the exact root (see
    :class:`_ExactRoot`). Batch expansion and multiplication by a constant (gpytorch's
    ``expand``, ``*``, ``/``) keep it; operations that rebuild the operator otherwise (``.to``,
    ``.detach``, slicing) give a plain sum again, which samples as gpytorch does (a jittered
    Cholesky factor).
    """

    #: Callable ``method -> root`` (shape (*batch, N, K)), or None: the sum's own root.
    _exact_root: Any = None
    #: The marginal variances the conditioning already computed (shape (*batch, N)), or None.
    _variance: Tensor | None = None

    def _diagonal(self) -> Tensor:
        if self._variance is not None:
            return self._variance
        return super()._diagonal()

    def _carry(self, out: ConditionedCovariance, factor: float, variance: Tensor | None) -> Any:
        if self._exact_root is not None:
            out._exact_root = (
                _MappedRoot(self._exact_root, factor) if factor != 1.0 else (self._exact_root)
            )
        out._variance = variance
        return out

    def _expand_batch(self, batch_shape: torch.Size | list[int]) -> LinearOperator:
        out = super()._expand_batch(batch_shape)
        var = self._variance
        var = None if var is None else var.expand(*batch_shape, var.shape[-1])
        return self._carry(out, 1.0, var)

    def _mul_constant(self, other: float | Tensor) -> LinearOperator:
        out = super()._mul_constant(other)
        c = float(other) if not isinstance(other, Tensor) or other.numel() == 1 else None
        if c is None or c < 0:  # not a covariance scaling: a plain sum
            return SumLinearOperator(*out.linear_ops)
        var = None if self._variance is None else self._variance * c
        return self._carry(out, math.sqrt(c), var)

    @cached(name="root_decomposition")
    def root_decomposition(self, method: str | None = None) -> LinearOperator:
        if self._exact_root is None:
            return super().root_decomposition(method=method)
        X = self._exact_root(method)
        return RootLinearOperator(X.expand(*self.batch_shape, *X.shape[-2:]))


def conditioned_covariance(
    base: LinearOperator,  # shape: (*batch, N, N), the model's covariance (source layout)
    downdate: Tensor,  # shape: (*batch, N, M), posterior covariance base - F F^T
    conditioned: Any = None,  # ConstrainedGaussian over the same flat layout, or None
    variance: Tensor | None = None,  # shape: (*batch, N), its diagonal when already known
    layout: tuple[LinearOperator, Tensor] | None = None,  # (base in the output's order, perm)
) -> LinearOperator:
    """The lazy posterior covariance; with ``conditioned`` (noise-free) its root is exact.

    ``layout = (op, perm)``: the result is returned in another order of the ``N`` positions,
    row ``i`` being row ``perm[i]`` of ``base`` (``op`` is ``base`` in that order: the
    interleaved multitask covariance, ``base`` its task-major view).
    """
    base = to_linear_operator(base)  # a tensor when the conditioning evaluated it
    F = downdate.to(dtype=base.dtype, device=base.device)
    perm = None if layout is None else layout[1]
    if perm is not None:
        F = F[..., perm, :]
        variance = None if variance is None else variance[..., perm]
    op = ConditionedCovariance(
        base if layout is None else layout[0], LowRankRootLinearOperator(F).mul(-1.0)
    )
    if variance is not None and variance.shape == op.shape[:-1]:
        op._variance = variance.to(base.dtype)
    if conditioned is not None and conditioned.noise_free:
        op._exact_root = _ExactRoot(conditioned, base.dtype, base, perm)
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

    def add_low_rank(
        self,
        low_rank_mat: Tensor | LinearOperator,
        root_decomp_method: str | None = None,
        root_inv_decomp_method: str | None = None,
        generate_roots: bool | None = True,
        **root_decomp_kwargs: Any,
    ) -> LinearOperator:
        """``self + B B^T`` kept lazy (a :class:`SparseCrossSum` with a low-rank root term)
        when no root decomposition is asked for; linear_operator's own method forms the dense
        ``N x N`` product ``B B^T`` (the PSD repair of the conditioning adds a rank-``M``
        term along the constraint rows: ``O(N M)`` here instead of ``O(N^2 M)``)."""
        has_roots = any(
            _is_in_cache_ignore_args(self, key)
            for key in ("root_decomposition", "root_inv_decomposition")
        )
        if generate_roots or has_roots:
            return super().add_low_rank(
                low_rank_mat, root_decomp_method, root_inv_decomp_method, generate_roots,
                **root_decomp_kwargs,
            )  # fmt: skip
        return SparseCrossSum(*self.linear_ops, LowRankRootLinearOperator(low_rank_mat))


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

    def _t_matmul(self, rhs: Tensor) -> Tensor:  # the base's own transpose: its gradient
        return self.base._t_matmul(rhs[..., self._inv, :])[..., self._perm, :]

    def _size(self) -> torch.Size:
        return self.base.shape

    def _transpose_nonbatch(self) -> LinearOperator:
        return TaskMajor(self.base._transpose_nonbatch(), self.num_points, self.num_tasks)

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


def interleaved(
    cov: Any,  # shape: (*batch, T n, T n), task-major (index t * n + i)
    num_points: int,
    num_tasks: int,
) -> tuple[LinearOperator, Tensor]:
    """``cov`` in the interleaved (point-major) order of gpytorch's multitask covariances, and
    the permutation ``perm`` (shape (T n,)): interleaved position ``i * T + t`` holds task-major
    position ``perm[i * T + t] = t * n + i``. A :class:`TaskMajor` view gives back its base."""
    if isinstance(cov, TaskMajor):
        return cov.base, cov._inv
    n, t = int(num_points), int(num_tasks)
    perm = torch.arange(n * t, device=cov.device).reshape(t, n).mT.reshape(-1)
    op = to_linear_operator(cov)
    return op[..., perm, :][..., :, perm], perm
