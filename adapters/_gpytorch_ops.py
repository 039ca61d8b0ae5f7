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

import math
import warnings
from typing import Any

import torch
from gpytorch.distributions import MultitaskMultivariateNormal, MultivariateNormal
from linear_operator import settings as lo_settings
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
    "ConstraintDroppedWarning",
    "SparseCrossSum",
    "TaskMajor",
    "conditioned_covariance",
    "constrained_type",
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
                shift = torch.full(parent.mean.shape[-1:], self.shift, dtype=torch.float64)
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
