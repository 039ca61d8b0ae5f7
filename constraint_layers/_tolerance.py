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

Rows (:func:`dependence_tol`, :func:`consistency_tol`, the engine section at the end)
    Rows depend on each other when a unit combination of the unit rows vanishes within their
    rounding; the right-hand sides of dependent rows agree when the same combination of them
    vanishes within the rounding of the values and the output dtype (``_dependence.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "BOUNDED_RTOL",
    "PSD_FACTOR",
    "RANK_FACTOR",
    "RANK_RCOND",
    "SUPPORT_RTOL",
    "SYMMETRY_RTOL",
    "TOLERANCES",
    "Tolerance",
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


def rounding(*dtypes: torch.dtype | None) -> float:
    """The unit rounding (machine epsilon) of the coarsest of ``dtypes``, float64's at least:
    the real part's for complex dtypes; integer, boolean and None entries count as float64
    (they convert exactly)."""
    eps = float(torch.finfo(torch.float64).eps)
    for d in dtypes:
        if d is None:
            continue
        if d.is_complex:
            d = torch.float64 if d == torch.complex128 else torch.float32
        if d.is_floating_point:
            eps = max(eps, float(torch.finfo(d).eps))
    return eps


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


# --- engine: row dependence and consistency ---
# The thresholds of the projection engine (``_project.py``, ``_project_bounds.py``,
# ``_bounded/``, ``_dependence.py``). Decisions AT ROUNDING are relative to the rounding unit of
# the data (``eps``) and the problem's size; decisions on CONDITIONING are fixed fractions.

#: Rows are dependent when a combination of the unit-normalised rows (a unit vector of
#: combination weights) has norm at most ``DEPENDENCE_FACTOR * sqrt(M) * (eps_rows +
#: eps64 * sqrt(max(M, N)))``: the rows' own rounding (``eps_rows``: float64, or the dtype the
#: coefficients were given in), summed over ``M`` rows, and the float64 factorisation's.
DEPENDENCE_FACTOR = 16.0
#: The right-hand sides of dependent rows agree when the vanishing combination of them is at
#: most ``CONSISTENCY_FACTOR * sqrt(M) * eps_rhs`` (``eps_rhs``: the coarsest rounding of the
#: values and the output dtype) times their size, plus the rows' own dependence tolerance.
CONSISTENCY_FACTOR = 64.0
#: A squared pivot of the unit-normalised rows' Gram matrix (the squared sine of the angle
#: between a row and the span of the ones before it) above this: the rows are independent far
#: above rounding, and the exact test (an SVD) is skipped.
GRAM_INDEPENDENT = 1e-8
#: Conditioning (not rounding): eigenvalues of ``G' G'^T`` (the rows on the freedom the boundary
#: step leaves) below this fraction of the largest are directions no free value can reach; a
#: residual there must vanish to the output dtype's ``residual`` tolerance. Formerly
#: ``_project.DEPENDENT_RTOL``.
REACH_RTOL = 1e-10
#: Rows named in an error: those whose weight in a vanishing combination is at least this
#: fraction of the combination's largest (labelling only, no decision).
CULPRIT_FRACTION = 1e-3

# bounded solvers (``_bounded/``), float64 throughout
_EPS64 = torch.finfo(torch.float64).eps
#: The separable solver: a row has converged when ``|f(lam) - d| <= SEPARABLE_RTOL * (sum_i
#: |c_i x_i| + |d|)`` (and ``4 *`` that for the breakpoint search's final check).
SEPARABLE_RTOL = 64 * _EPS64
#: The former name of :data:`SEPARABLE_RTOL`.
BOUNDED_RTOL = SEPARABLE_RTOL
#: The general (Goldfarb-Idnani) solver: a bound is violated beyond ``ACTIVE_SET_ROUNDING * eps
#: * scale`` (``scale``: the largest value and finite bound).
ACTIVE_SET_ROUNDING = 1e3
#: The general solver's feasibility judgement: a total within ``FEASIBILITY_RTOL * (|C| |u| +
#: |d|)`` of an end of its reachable range sits at that end (it pins its entries).
FEASIBILITY_RTOL = 1e-12
#: Relative jitters (times the largest variance) tried on a numerically singular dense metric.
BOUNDED_JITTER = (0.0, 1e-12, 1e-10, 1e-8)
#: The faces solver (``_bounded/faces.py``) stops when the rows hold, and the inequalities hold
#: (with equality where their multiplier is positive), within ``FACES_ROUNDING * eps * scale``.
FACES_ROUNDING = 256
#: The faces solver's final solve: squared Cholesky pivots below this fraction of their diagonal
#: entry mean rows dependent over the free entries (a periodic pair, a wall row a total implies):
#: the pseudo-inverse then.
FACES_PIVOT_RTOL = 1e-12
#: The faces solver's Newton ridge, relative to each row's squared norm (an exact step's error
#: from it is removed by the next step).
FACES_RIDGE = 1e-10


def dependence_tol(eps_rows: float, m: int, n: int) -> float:
    """The norm below which a unit combination of ``m`` unit rows of length ``n`` vanishes."""
    eps64 = torch.finfo(torch.float64).eps
    return DEPENDENCE_FACTOR * max(m, 1) ** 0.5 * (eps_rows + eps64 * max(m, n, 1) ** 0.5)


def consistency_tol(eps_rhs: float, m: int) -> float:
    """The relative size below which a vanishing combination of ``m`` right-hand sides is 0."""
    return CONSISTENCY_FACTOR * max(m, 1) ** 0.5 * eps_rhs


# --- local rows (``constraint_layers/local``): matrix-free solves, float64 work ---
#: CG stops when every row's residual is below this fraction of ``row_scale max|u| + max|f|``.
CG_RTOL = 1e-13
#: The largest rows' residual accepted after CG (relative, as above).
ACCEPT_RTOL = 1e-11
#: A residual left beyond this (relative) means the rows cannot hold: incompatible data.
INCONSISTENT_RTOL = 1e-7
#: An eigenvalue of ``C C^T`` (or of a Schur complement, or a squared symbol) below this fraction
#: of the largest is zero.
NULL_RTOL = 1e-10
#: A row takes part in an incompatible combination when its weight in it exceeds this.
INVOLVED_RTOL = 1e-6
#: The most CG iterations.
MAXITER = 2000
#: The window (nodes per axis) over which the variance is averaged for the preconditioner.
BOX_WINDOW = 9
#: CG stops when the residual has not halved for this many iterations (non-monotone residuals of
#: ill-conditioned operators recover within it), or grows beyond ``GROWTH`` times its start.
PATIENCE = 200
GROWTH = 1e8
#: Values the local bounded solver reads as inside their bounds: violations at most this fraction
#: of the problem's scale (the largest value and finite bound) are rounding.
LOCAL_BOUND_RTOL = 1e-12
#: The exact (capacitance) solve corrects the fast solve on the nodes where the system differs from
#: it (next to Dirichlet nodes) when they number at most this (a dense |B| x |B| matrix, set up
#: once per operator and mask); beyond it, CG preconditioned by the fast solve alone.
CAPACITANCE_MAX_NODES = 4096
#: The fast solve diagonalises an axis's factor by the DCT (O(n log n), by FFT) from this many
#: nodes on (below: its dense eigenvectors, O(n^2) per line but one matrix product), where the
#: factor differs from the DCT-diagonalised matrix of its interior stencil on at most
#: ``DCT_END_ROWS`` rows at each end. Off (2^30) by default: measured for the divergence with
#: walls, the DCT solve with its capacitance correction (about 16 n nodes) is slower per solve than
#: the dense eigenvectors up to 129^2 and its set-up grows like n^3; without the correction CG's
#: iterations grow with n (docs/guide/local-constraints.md).
DCT_MIN_NODES = 1 << 30
DCT_END_ROWS = 6
#: A node belongs to that set when the difference there exceeds this fraction of the probe's scale.
CAPACITANCE_SUPPORT_RTOL = 1e-11
