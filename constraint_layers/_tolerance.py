"""The one module of numerical thresholds of the engine (private).

Every numerical decision of the library (is a residual small enough, is a pivot zero, is a
negative variance rounding) reads its threshold here, judged at the dtype's rounding and the
problem's scale. Sections below; other parts of the engine add theirs at the end of the file.

Residuals and references (:data:`TOLERANCES`, :func:`tolerance`)
    ``residual``: the largest residual of a constraint row after enforcement, relative to the size
    of the terms it balances (``max |u| + |d|``, Neumann rows scaled by the spacing). It is what
    ``debug=True`` checks after every call and what the test mixins assert.
    ``reference``: how far two correct computations of the same result may differ, relative to
    the size of the result (the fast paths against the dense float64 references).

Rounding, rank and positive semidefiniteness (:func:`rounding`, :func:`rank_cutoff`,
:func:`psd_floor`, :func:`is_rounding`)
    A symmetric positive semidefinite matrix of order ``n`` whose largest eigenvalue (or
    diagonal entry) is ``scale``, computed in ``dtype``, is known only to about
    ``n * eps * scale``. Eigenvalues and squared pivots at or below :func:`rank_cutoff` are zero
    (numerical rank); negative values down to ``-psd_floor`` are rounding and are clamped to 0
    silently. Anything more negative means the matrix given is indefinite beyond rounding (an
    inaccurate model covariance): the conditioning then follows gpytorch (jitter, or a clamp)
    with an :class:`~constraint_layers.errors.IndefiniteCovarianceWarning`. The judgement uses
    the precision the matrix was *computed in* (a float32 covariance promoted to float64 is still
    known to float32's rounding), and the decisions compare against margins many times the
    rounding, so they do not depend on the machine's BLAS (summation order).

Rows (:func:`dependent_rtol`, :func:`consistent_rtol`)
    Squared Cholesky pivots below ``dependent_rtol`` of their row's norm: the row depends on the
    ones before it. Right-hand sides of dependent rows that disagree by more than
    ``consistent_rtol`` (relative): incompatible constraints.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BOUNDED_RTOL",
    "CONSISTENT_RTOL",
    "DEPENDENT_RTOL",
    "PSD_FACTOR",
    "RANK_FACTOR",
    "RANK_RCOND",
    "SUPPORT_RTOL",
    "SYMMETRY_RTOL",
    "TOLERANCES",
    "Tolerance",
    "consistent_rtol",
    "dependent_rtol",
    "is_rounding",
    "model_rounding",
    "psd_floor",
    "rank_cutoff",
    "rounding",
    "tolerance",
]


# ------------------------------------------------------------------- residuals and references
class Tolerance(NamedTuple):
    residual: float
    reference: float


#: Relative tolerances by dtype (architecture.md: float32 about 1e-5, float64 about 1e-12).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-12, 1e-12),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.float16: Tolerance(5e-3, 5e-3),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
    torch.complex128: Tolerance(1e-12, 1e-12),
    torch.complex64: Tolerance(1e-5, 1e-5),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerances of ``dtype`` (float32's for dtypes not in the table)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


# ------------------------------------------------------------------ rounding, rank and PSD
#: Margin of the numerical rank over the rounding ``n * eps * scale`` of a PSD matrix.
RANK_FACTOR = 16.0
#: Margin of the negative values read as rounding over ``n * eps * scale``.
PSD_FACTOR = 64.0


def rounding(dtype: torch.dtype) -> float:
    """The unit rounding (machine epsilon) of ``dtype``: that of its real part for complex
    dtypes, float64's for integer and boolean dtypes (they convert exactly)."""
    if dtype.is_complex:
        dtype = torch.float64 if dtype == torch.complex128 else torch.float32
    if not dtype.is_floating_point:
        dtype = torch.float64
    return float(torch.finfo(dtype).eps)


def _size(n: int) -> int:
    return max(int(n), 1)


def rank_cutoff(dtype: torch.dtype, scale: float | Tensor, n: int = 1) -> float | Tensor:
    """Eigenvalues (or squared Cholesky pivots) at or below this are numerically zero.

    One cutoff for every rank decision of a PSD matrix: the pseudo-inverse of ``G Sigma G^T``,
    the root used for samples and the pseudo-determinant of the density.

    Parameters
    ----------
    dtype : torch.dtype
        The precision the matrix was computed in (not the one it is stored in).
    scale : float or Tensor
        Its largest eigenvalue or diagonal entry (a tensor: one per batch entry, keepdim).
    n : int
        Its order, or the number of terms summed into each entry, whichever is larger.

    Returns
    -------
    float or Tensor
        ``RANK_FACTOR * n * rounding(dtype) * scale`` (the type of ``scale``).
    """
    return RANK_FACTOR * _size(n) * rounding(dtype) * scale


def psd_floor(
    dtype: torch.dtype, scale: float | Tensor, n: int = 1, condition: float | Tensor = 1.0
) -> float | Tensor:
    """How negative a variance (or an eigenvalue, or ``g Sigma g^T``) may be and still be rounding.

    A quantity ``d - f`` that is non-negative in exact arithmetic, with ``d`` and ``f`` of size
    ``scale`` computed from ``n`` terms in ``dtype``, through a solve whose condition number is
    ``condition``, is rounding down to ``-psd_floor``: clamp it to 0 silently. Below that the
    matrix it came from is indefinite beyond rounding.

    Returns
    -------
    float or Tensor
        ``PSD_FACTOR * (n + condition) * rounding(dtype) * scale``.
    """
    return PSD_FACTOR * (_size(n) + condition) * rounding(dtype) * scale


def model_rounding(dtype: torch.dtype, scale: float | Tensor) -> float | Tensor:
    """How far a model's own covariance may miss symmetry or positive semidefiniteness and still
    count as its rounding: ``sqrt(rounding(dtype)) * scale``.

    A GP posterior ``K** - K*x K^{-1} Kx*`` is computed with cancellation by an algorithm the
    library does not see (an ill-conditioned ``K``: float64 exact GPs miss by 1e-11 of the
    result). Misses beyond rounding (``psd_floor``) but within this are repaired silently; beyond
    it the covariance is inaccurate (float32, CG) and the repair warns.
    """
    return math.sqrt(rounding(dtype)) * scale


def is_rounding(
    value: Tensor, dtype: torch.dtype, scale: float | Tensor, n: int = 1, condition: float = 1.0
) -> Tensor:
    """Elementwise: ``value >= -psd_floor(...)`` (NaN is not rounding)."""
    return value >= -psd_floor(dtype, scale, n, condition)


# ---------------------------------------------------------------------------------- rows
#: A squared pivot below this fraction of its row's norm: the row depends on the ones before it
#: (float64 algebra).
DEPENDENT_RTOL = 1e-10
#: Relative disagreement of right-hand sides (float64 data) beyond which dependent rows are
#: incompatible.
CONSISTENT_RTOL = 1e-10


def dependent_rtol(dtype: torch.dtype = torch.float64) -> float:
    """Squared pivot (relative to its row's squared norm) below which a row is dependent, for
    rows known to the rounding of ``dtype`` (float64: ``DEPENDENT_RTOL``)."""
    return max(DEPENDENT_RTOL, 1e3 * rounding(dtype))


def consistent_rtol(dtype: torch.dtype = torch.float64) -> float:
    """Relative disagreement of dependent rows' right-hand sides (data in ``dtype``) read as
    rounding (float64: ``CONSISTENT_RTOL``)."""
    return max(CONSISTENT_RTOL, 1e3 * rounding(dtype))


# ------------------------------------------------------------------- covariances and densities
#: Relative asymmetry tolerated in a caller's covariance matrix, by dtype (the random probe of
#: ``conserve``; a model's linear operator is judged by ``psd_floor`` and symmetrised instead).
SYMMETRY_RTOL: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 1e-2,
    torch.bfloat16: 1e-2,
}
#: Eigenvalues below this fraction of the largest are numerically zero in the density of a
#: degenerate Gaussian, by the covariance's dtype (the cutoffs of
#: ``scipy.stats.multivariate_normal(allow_singular=True)``).
RANK_RCOND: dict[torch.dtype, float] = {
    torch.float64: 1e6 * 2.220446049250313e-16,
    torch.float32: 1e3 * 1.1920929e-07,
}
#: Relative residual ``|G x - b| / (|G| |x| + |b|)`` still read as on the constraint set.
SUPPORT_RTOL: dict[torch.dtype, float] = {torch.float64: 1e-10, torch.float32: 1e-4}


# ------------------------------------------------------------------------- bounded solvers
#: A row of the bounded solvers has converged when ``|f(lam) - d| <= BOUNDED_RTOL * (sum_i
#: |c_i x_i| + |d|)`` (float64 algebra).
BOUNDED_RTOL = 64 * torch.finfo(torch.float64).eps
