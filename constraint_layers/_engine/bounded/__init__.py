"""Projection onto linear equality rows AND box bounds (private; pure tensor functions, torch only).

The problem, for a prediction ``u`` and a metric ``W`` (symmetric positive semidefinite)::

    minimise   (x - u)^T W^{-1} (x - u)
    subject to C x = d   and   lower <= x <= upper        (bounds may be -inf / +inf per entry)

``W`` is the mobility of each value: the Euclidean projection (``W = I``, a deterministic model,
HardC), the boundary mobility, or the model's covariance (a Gaussian output, ProbConserv). An
entry with zero weight (a zero row and column of ``W``) is fixed: it cannot move. Without active
bounds the solution is the equality-only projection ``u - W C^T (C W C^T)^{-1} (C u - d)``
(:func:`constraint_layers.functional.condition_gaussian` with ``noise = 0``).

Three solvers:

* :func:`project_bounded_rows`, the separable fast path. ``W = diag(w)`` and rows that touch
  disjoint entries (one quadrature row per time frame), laid out as ``(*batch, M, n)``: row ``m``
  is ``sum_i c[..., m, i] x[..., m, i] = d[..., m]``. The KKT conditions give
  ``x_i = clip(u_i - w_i c_i lam_m, lower_i, upper_i)`` with one multiplier per row, and
  ``f(lam) = sum_i c_i x_i(lam)`` is continuous, piecewise linear and non-increasing, with
  breakpoints where an entry meets a bound. ``lam`` is found exactly: a safeguarded Newton
  iteration on the segments of ``f`` (each step solves the linear equation of the current
  segment; it stops when the step lands on a point where ``f = d`` to rounding, i.e. on its own
  segment), kept inside a bracket of the root; if that does not finish (a zero slope, a step
  outside the bracket, 60 steps), the row falls back to the sorted-breakpoint search (sort, find
  the segment that holds ``d`` by bisection over the breakpoints, solve its linear equation).
  Every row of every sample is solved at once (vectorised); rows are processed in cache-sized
  groups so that the iteration runs on data in cache. Autograd: a hand-written backward, the
  implicit function theorem on the active set.
* :func:`project_bounded`, the general path: any ``W`` (a dense covariance, a diagonal, or the
  identity) and overlapping rows ``C`` (``M x N``, ``M`` small). The dual active-set method of
  Goldfarb and Idnani (finite, exact; it starts from the equality-only projection and adds the
  most violated bound, dropping bounds whose multiplier would change sign) finds the active set;
  the result is then the equality-only projection onto the rows plus the active bounds (written
  with torch operations, so autograd differentiates the active-set solution). Looped over
  samples; cost per sample O(N^2 (M + k)) for ``k`` active bounds. (A primal-dual active-set
  search, only (M + k)-sized systems, was tried: it cycled on smooth, GP-like covariances.)

* :func:`~constraint_layers._engine.bounded.faces.project_faces_bounded`, the path with the boundary
  step eliminated (deterministic outputs with walls): a few dense rows, the box, and sparse
  inequality rows on the values the step sets, by a projected Newton method on the dual (exact).

Gaussian outputs (the semantics the layer implements with :func:`active_bounds`): the bounded
mean is the MODE of the conditioned Gaussian ``u | C u = d`` restricted to the box (on the affine
set ``C u = d`` the conditioned density is ``exp(-(x - u)^T W^{-1} (x - u) / 2)`` up to a constant,
so its maximiser over the box is the bounded projection in the covariance metric). The variance
is set to 0 where a bound is active and the free entries are conditioned on the equality rows
over the free set: that is the equality-only conditioning with the active entries' variance set
to zero (e.g. ``condition_gaussian(x, G, d, variance=torch.where(active, 0, var))``, whose mean
is ``x`` itself because ``x`` already satisfies the rows).

Exactness: rows hold to rounding (the algebra runs in float64, results come back in the input
dtype); bounds hold exactly (no value outside, the bounds rounded to the output dtype). Infeasible
data (no point of the box satisfies a row) raise :class:`~constraint_layers.errors.ConstraintError`
naming the rows, the requested total and the reachable range.
"""

from __future__ import annotations

from .general import active_bounds, project_bounded
from .separable import project_bounded_rows

__all__ = ["active_bounds", "project_bounded", "project_bounded_rows"]
