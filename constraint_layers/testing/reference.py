"""Dense float64 references derived from the rows, for every constraint family and any mix.

They build ``C`` (and the directions of the boundary step) densely and solve with
pseudo-inverses: slow and simple on purpose, independent of the fast paths they check. Keep the
grids small.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._project import _noise_rows, dense_projection, split_families
from ..boundary.enforce import boundary_rows
from ..conservation.enforce import grid_view
from ..conservation.gaussian import Gaussian
from ..rows import DEFAULT_GRID, GridSpec, Rows

__all__ = [
    "dense_update",
    "reference_enforce",
    "reference_prediction",
    "relative_residual",
    "rows_of",
]

F64 = torch.float64


def dense_update(
    mean: Tensor,
    G: Tensor,
    b: Tensor,
    *,
    variance: Tensor | None = None,
    covariance: Tensor | None = None,
    noise: float | Tensor = 0.0,
) -> tuple[Tensor, Tensor | None]:
    """The conditioning formulas with explicit dense float64 matrices (a test reference).

    ``mean`` (B, N); ``G`` (M, N) or (B, M, N); ``b`` (B, M); ``variance`` (B, N) or
    ``covariance`` (B, N, N); none: the Euclidean projection. ``noise``: a number or one per row
    (M,). Returns the mean (B, N) and the dense posterior covariance (B, N, N) (None without
    uncertainty). Dependent rows are handled by the pseudo-inverse.
    """
    mu = mean.to(F64)
    G = G.to(F64).expand(mu.shape[0], *G.shape[-2:])
    b = b.to(F64)
    if covariance is not None:
        S = covariance.to(F64)
    elif variance is not None:
        S = torch.diag_embed(variance.to(F64))
    else:
        S = None
    W = torch.eye(mu.shape[-1], dtype=F64).expand(mu.shape[0], -1, -1) if S is None else S
    s2 = torch.as_tensor(noise, dtype=F64).square() * torch.ones(G.shape[-2], dtype=F64)
    A = G @ W @ G.mT + torch.diag_embed(s2)
    K = (torch.linalg.pinv(A, hermitian=True) @ (G @ W)).mT  # W G^T A^+
    new_mean = mu - (K @ (G @ mu.unsqueeze(-1) - b.unsqueeze(-1))).squeeze(-1)
    new_cov = None if S is None else S - K @ G @ S
    return new_mean, new_cov


def reference_enforce(y: Tensor, bcs: Sequence[Any], *, lift: int = 0, **grid: Any) -> Tensor:
    """Dense float64 reference of the boundary step.

    For each condition in order, the projection ``u - V (C V)^+ (C u - d)`` with the condition's
    rows ``C u = d`` and directions ``V`` (from
    :func:`~constraint_layers.functional.boundary_rows`; ``V = W C^T`` with ``W`` the nodes it
    moves, a smooth profile with ``lift``). Differentiable.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn)
    bcs : sequence of BoundaryCondition
    **grid
        ``spacing``, ``extent``, ``endpoint``, ``inputs`` as for ``enforce_boundary``.

    Returns
    -------
    Tensor
        shape: like ``y``, float64.
    """
    rows = boundary_rows(y.shape, bcs, lift=lift, **grid)
    u = dense_projection(y.reshape(y.shape[0], -1), rows, sequential=True)
    return u.reshape(y.shape)


def relative_residual(y: Tensor, bcs: Sequence[Any], **grid: Any) -> float:
    """Largest relative residual of the boundary rows (where each condition is in charge).

    Each row's residual relative to the terms it balances
    (:meth:`~constraint_layers.rows.Rows.relative_residual`).
    """
    rows = boundary_rows(y.shape, bcs, include_overridden=False, **grid)
    u = y.detach().reshape(y.shape[0], -1)
    worst = 0.0
    for r in rows:
        if r.num_rows:
            worst = max(worst, float(r.relative_residual(u).max()))
    return worst


def rows_of(
    constraints: Sequence[Any],
    shape: Sequence[int],
    *,
    grid: GridSpec = DEFAULT_GRID,
    inputs: Any = None,
    include_overridden: bool = False,
    lift: int = 0,
) -> tuple[list[Rows], list[Rows]]:
    """``(boundary rows, conservation rows)`` of ``constraints`` for an output grid ``shape``."""
    bnd, con = split_families(constraints)
    brows = []
    if bnd:
        brows = boundary_rows(
            shape, bnd, spacing=grid.spacing, extent=grid.extent, endpoint=grid.endpoint,
            inputs=inputs, include_overridden=include_overridden, lift=lift,
        )  # fmt: skip
    crows = [c.rows(shape, grid=grid, inputs=inputs) for c in con]
    return brows, crows


def reference_prediction(
    pred: Gaussian,
    constraints: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    lift: int = 0,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
) -> tuple[Tensor, Tensor | None]:
    """The dense float64 reference of the constrained prediction, for any mix of constraints.

    Deterministic: the boundary step ``B(v) = S v + f`` (sequential dense projections), then the
    conservation rows on the remaining freedom (``G S``), Euclidean, then ``B`` again. Gaussian:
    conditioning on all rows stacked: the boundary step's fixed points ``(I - S) u = f`` and the
    conservation rows (noise, if any, on the conservation rows only). Returns the
    mean (the prediction's shape) and the marginal variance (None without uncertainty), float64.
    """
    k = pred.event_ndim
    mean = pred.mean
    shape = grid_view(mean, k, grid_shape, "reference_prediction")
    n = math.prod(shape[1:])
    u = mean.reshape(shape[0], n).to(F64)
    deterministic = pred.variance is None and pred.covariance is None and pred.low_rank is None
    if deterministic:
        brows, crows = rows_of(constraints, shape, grid=grid, inputs=inputs,
                               include_overridden=True, lift=lift)  # fmt: skip

        def step(v: Tensor) -> Tensor:
            return dense_projection(v, brows, sequential=True) if brows else v

        z = step(u)
        if crows:
            zero = [r._replace(rhs=torch.zeros_like(r.rhs[:1])) for r in brows]
            eye = torch.eye(n, dtype=F64)
            S = (dense_projection(eye, zero, sequential=True) if zero else eye).mT  # z = S u + f
            G, b = _stack_dense(crows, shape[0], n)
            Gp = G @ S
            r = (G @ z.unsqueeze(-1)).squeeze(-1) - b
            A = Gp @ Gp.mT
            coef = (torch.linalg.pinv(A, hermitian=True) @ r.unsqueeze(-1)).squeeze(-1)
            z = step(u - (Gp.mT @ coef.unsqueeze(-1)).squeeze(-1))
        return z.reshape(mean.shape), None
    # the boundary constraint set: the fixed points of the (dense) boundary step, I - S rows
    brows, crows = rows_of(constraints, shape, grid=grid, inputs=inputs, include_overridden=True)
    G, b = (
        _stack_dense(crows, shape[0], n)
        if crows
        else (torch.zeros(shape[0], 0, n, dtype=F64), torch.zeros(shape[0], 0, dtype=F64))
    )
    nb = 0
    if brows:
        zero = [r._replace(rhs=torch.zeros_like(r.rhs[:1])) for r in brows]
        eye = torch.eye(n, dtype=F64)
        S = dense_projection(eye, zero, sequential=True).mT
        f = dense_projection(torch.zeros(shape[0], n, dtype=F64), brows, sequential=True)
        Cb = (eye - S).expand(shape[0], n, n)
        G, b = torch.cat([Cb, G], -2), torch.cat([f, b], -1)
        nb = n
    s = _noise_rows(noise, [nb], [r.num_rows for r in crows]) if not isinstance(
        noise, (list, tuple)) else _noise_rows(  # per constraint: boundary rows exact here
        [0.0] + [v for c, v in zip(constraints, noise) if c.family != "boundary"],
        [nb], [r.num_rows for r in crows])  # fmt: skip
    cov = pred.covariance
    if cov is not None:
        cov = cov.to_dense() if hasattr(cov, "to_dense") else cov
        cov = torch.as_tensor(cov).to(F64).reshape(shape[0], n, n)
    var = None if pred.variance is None else pred.variance.reshape(shape[0], n).to(F64)
    if pred.low_rank is not None:
        L = pred.low_rank.to(F64).reshape(shape[0], n, -1)
        cov = L @ L.mT + (torch.diag_embed(var) if var is not None else 0.0)
        var = None
    if metric == "euclidean":
        m, _ = dense_update(u, G, b, noise=s)
        v0 = var if cov is None else cov.diagonal(dim1=-2, dim2=-1)
        return m.reshape(mean.shape), v0.reshape(mean.shape)
    m, post = dense_update(u, G, b, variance=var, covariance=cov, noise=s)
    return m.reshape(mean.shape), post.diagonal(dim1=-2, dim2=-1).reshape(mean.shape)


def _stack_dense(rows: Sequence[Rows], batch: int, n: int) -> tuple[Tensor, Tensor]:
    s = Rows.stack(rows, batch)
    G = s.dense(n)
    return (G if G.ndim == 3 else G.expand(batch, *G.shape)), s.rhs
