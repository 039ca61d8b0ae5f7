"""The one table of tolerances by dtype (private).

``residual``: the largest residual of a constraint row after enforcement, relative to the size of
the terms it balances (``max |u| + |d|``, Neumann rows scaled by the spacing). It is what
``debug=True`` checks after every call and what the test mixins assert.
``reference``: how far two correct computations of the same result may differ, relative to the
size of the result (the fast paths against the dense float64 references).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TOLERANCES", "Tolerance", "rank_cutoff", "tolerance"]


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


# ----------------------------------------------------------------- gp-objects (issue 21) ----
# Provisional: the numerical rank of a PSD matrix, shared by the root used for samples and the
# density of a degenerate posterior (conservation/posterior.py). gp-numerics owns this module and
# defines the same function in its rank/PSD section; on merging, keep theirs and delete this one.
#: Margin of the numerical rank over the rounding ``n * eps * scale`` of a PSD matrix.
RANK_FACTOR = 16.0


def rank_cutoff(
    dtype: torch.dtype, scale: float | torch.Tensor, n: int = 1
) -> float | torch.Tensor:
    """Eigenvalues (or squared pivots) of a PSD matrix at or below this are numerically zero.

    Parameters
    ----------
    dtype : torch.dtype
        The precision the matrix was computed in (not the one it is stored in).
    scale : float or Tensor
        Its largest eigenvalue (a tensor: one per batch entry, keepdim).
    n : int
        Its order.

    Returns
    -------
    float or Tensor
        ``RANK_FACTOR * n * eps(dtype) * scale``.
    """
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 2.220446049250313e-16
    return RANK_FACTOR * max(int(n), 1) * eps * scale


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


def rounding(*dtypes: torch.dtype | None) -> float:
    """The coarsest rounding unit of ``dtypes`` (floating ones; float64's at least)."""
    eps = torch.finfo(torch.float64).eps
    for d in dtypes:
        if d is not None and d.is_floating_point:
            eps = max(eps, torch.finfo(d).eps)
    return eps


def dependence_tol(eps_rows: float, m: int, n: int) -> float:
    """The norm below which a unit combination of ``m`` unit rows of length ``n`` vanishes."""
    eps64 = torch.finfo(torch.float64).eps
    return DEPENDENCE_FACTOR * max(m, 1) ** 0.5 * (eps_rows + eps64 * max(m, n, 1) ** 0.5)


def consistency_tol(eps_rhs: float, m: int) -> float:
    """The relative size below which a vanishing combination of ``m`` right-hand sides is 0."""
    return CONSISTENCY_FACTOR * max(m, 1) ** 0.5 * eps_rhs
