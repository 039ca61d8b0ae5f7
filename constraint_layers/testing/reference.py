"""Dense float64 references derived from the rows, for every constraint family and any mix.

They build ``C`` (and the directions of the boundary step) densely and solve with
pseudo-inverses: slow and simple on purpose, independent of the fast paths they check. Keep the
grids small.

Local rows (``cl.DivergenceFree``, ``cl.Continuity``, ``cl.LinearPDE``: one row per node, stated
by the constraint as an operator) enter as a dense matrix built from the operator's Kronecker
factors (:func:`dense_local`), next to the conservation rows: the Euclidean projection onto all
of them on the freedom the boundary step leaves, or the conditioning on all rows stacked. That
is the library's semantics for local rows with Dirichlet walls (the Dirichlet nodes held, the
other nodes moved), with other walls (``B(u - S^T C^T (C S S^T C^T)^+ (C B(u) - f))``), with
totals and with bounds.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._project import _noise_rows, dense_projection
from ..boundary.enforce import boundary_rows
from ..conservation.enforce import grid_view
from ..conservation.gaussian import Gaussian
from ..rows import DEFAULT_GRID, GridSpec, Rows

__all__ = [
    "dense_local",
    "dense_qp",
    "dense_update",
    "local_as_rows",
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


def _kkt_solve(u: Tensor, W: Tensor, N: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``x = u + W N^T lam`` with ``N x = rhs`` (pseudo-inverse: dependent rows allowed)."""
    WN = W @ N.mT
    lam = torch.linalg.pinv(N @ WN, hermitian=True) @ (rhs - N @ u)
    return u + WN @ lam, lam


def _amax(t: Tensor) -> float:
    """The largest entry of ``t`` (0 when empty)."""
    return float(t.max()) if t.numel() else 0.0


def dense_qp(
    u: Tensor,
    E: Tensor,
    e: Tensor,
    A: Tensor | None = None,
    c: Tensor | None = None,
    W: Tensor | None = None,
    *,
    rtol: float = 1e-10,
) -> Tensor:
    """The dense float64 reference of a projection with equality AND inequality rows.

    Solves, for one sample,

        minimise   (x - u)^T W^{-1} (x - u)
        subject to E x = e   and   A x >= c

    (``W`` positive definite, default the identity) by the dual method of Goldfarb and Idnani
    written plainly: from the equality-only projection, add the most violated inequality, step
    along its direction in the null space of the active rows, drop an active inequality whose
    multiplier would turn negative; every system re-solved densely by pseudo-inverses. The result
    is re-derived from the final active set and CHECKED against the KKT conditions (rows,
    inequalities, multiplier signs; ``rtol`` relative to the problem's scale): a result that fails
    them raises ``AssertionError``, so a passing comparison is against the true optimum. Slow on
    purpose (``O(k)`` dense solves for ``k`` active rows): keep the problems small.

    Parameters
    ----------
    u : Tensor
        shape: (N,).
    E, e : Tensor
        shape: (M, N) and (M,): the equality rows (M may be 0).
    A, c : Tensor, optional
        shape: (K, N) and (K,): the inequality rows (bounds are rows ``+-e_i``).
    W : Tensor, optional
        shape: (N, N), the metric.

    Returns
    -------
    Tensor
        shape: (N,), float64; differentiable (autograd through the projection onto the rows
        and the final active set).
    """
    return _dense_qp(u, E, e, A, c, W, rtol=rtol)[0]


def _dense_qp(
    u: Tensor,
    E: Tensor,
    e: Tensor,
    A: Tensor | None = None,
    c: Tensor | None = None,
    W: Tensor | None = None,
    *,
    rtol: float = 1e-10,
) -> tuple[Tensor, Tensor]:
    """``dense_qp`` and the active inequality rows (mask over the finite ones)."""
    n = u.shape[0]
    u_g = u.to(F64)  # kept with their graphs: the result is differentiable (the active set's)
    E_g, e_g = E.to(F64).reshape(-1, n), e.to(F64).reshape(-1)
    A_g = torch.zeros(0, n, dtype=F64) if A is None else A.to(F64).reshape(-1, n)
    c_g = torch.zeros(0, dtype=F64) if c is None else c.to(F64).reshape(-1)
    W_g = torch.eye(n, dtype=F64) if W is None else W.to(F64)
    keep = torch.isfinite(c_g.detach())  # an infinite bound binds nothing
    A_g, c_g = A_g[keep], c_g[keep]
    u, E, e, A, c, W = (t.detach() for t in (u_g, E_g, e_g, A_g, c_g, W_g))
    m = E.shape[0]
    scale = float(u.abs().max()) + _amax(e.abs()) + 1.0
    finite_c = c[torch.isfinite(c)]
    scale += float(finite_c.abs().max()) if finite_c.numel() else 0.0
    tol = rtol * scale
    active: list[int] = []
    x, lam = _kkt_solve(u, W, E, e) if m else (u.clone(), u.new_zeros(0))
    mult = lam.clone()  # multipliers: equalities, then the active inequalities
    for _ in range(20 * (A.shape[0] + m) + 20):
        slack = A @ x - c
        if active:
            slack[active] = math.inf
        p = int(slack.argmin()) if slack.numel() else -1
        if p < 0 or not float(slack[p]) < -tol:
            break
        a = A[p]
        lam_p = 0.0
        while True:
            N = torch.cat([E, A[active]])
            if N.shape[0]:
                WN = W @ N.mT
                r = torch.linalg.pinv(N @ WN, hermitian=True) @ (N @ (W @ a))
                z = W @ a - WN @ r
            else:
                r, z = a.new_zeros(0), W @ a
            az = float(a @ z)
            t2 = (float(c[p]) - float(a @ x)) / az if az > 1e-14 * float(a @ W @ a) else math.inf
            t1, drop = math.inf, -1
            for j in range(len(active)):
                rj = float(r[m + j])
                if rj > 1e-14 and float(mult[m + j]) / rj < t1:
                    t1, drop = float(mult[m + j]) / rj, j
            t = min(t1, t2)
            if math.isinf(t):
                raise ValueError("dense_qp: the rows and inequalities have no common point")
            x = x + t * z
            mult = mult - t * r
            lam_p += t
            if t == t2:
                active.append(p)
                mult = torch.cat([mult, mult.new_tensor([lam_p])])
                break
            del active[drop]
            mult = torch.cat([mult[: m + drop], mult[m + drop + 1 :]])
    else:
        raise AssertionError("dense_qp: the active-set iteration did not terminate")
    N = torch.cat([E, A[active]])
    rhs = torch.cat([e, c[active]])
    x = _kkt_solve(u, W, N, rhs)[0] if N.shape[0] else u
    N_g = torch.cat([E_g, A_g[active]])
    x_g = _kkt_solve(u_g, W_g, N_g, torch.cat([e_g, c_g[active]]))[0] if N.shape[0] else u_g
    # the KKT conditions, checked: rows, inequalities, stationarity with the method's
    # multipliers, and their signs (>= 0 on the inequalities)
    big = _amax(mult.abs()) + 1.0
    checks = {
        "rows": _amax((E @ x - e).abs()),
        "inequalities": _amax((c - A @ x).clamp_min(0)),
        "stationarity": _amax((x - u - W @ (N.mT @ mult)).abs()) / big,
        "multipliers": _amax((-mult[m:]).clamp_min(0)) / big,
    }
    for what, err in checks.items():
        if not err <= tol:
            raise AssertionError(f"dense_qp: the KKT conditions fail ({what}: {err:.3e})")
    mask = torch.zeros(keep.shape[0], dtype=torch.bool)
    mask[keep.nonzero().flatten()[active]] = True
    return x_g, mask


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
    """``(boundary rows, the other equality rows)`` of ``constraints`` for an output grid
    ``shape``: the other rows are the conservation rows and the local rows (as dense rows,
    ``local_as_rows``), in the order the constraints are given. Bounds state no rows."""
    bnd = [c for c in constraints if c.family == "boundary"]
    brows = []
    if bnd:
        brows = boundary_rows(
            shape, bnd, spacing=grid.spacing, extent=grid.extent, endpoint=grid.endpoint,
            inputs=inputs, include_overridden=include_overridden, lift=lift,
        )  # fmt: skip
    crows = []
    for c in constraints:
        if c.family == "conservation":
            crows.append(c.rows(shape, grid=grid, inputs=inputs))
        elif c.family == "local":
            crows.append(local_as_rows(c.rows(shape, grid=grid, inputs=inputs)))
    return brows, crows


def dense_local(rows: Any) -> Tensor:
    """The dense float64 ``C`` of local rows, from the Kronecker factors of their operator.

    ``C u = sum_k a_k D_k u_{c_k}`` on a grid output flattened in C order over ``(channels, d1,
    ..., dn)``: the column block of channel ``c`` is ``sum_{k: c_k = c} a_k (I x ... x D_k x ...
    x I)``, ``D_k`` the (n, n) matrix of term ``k``'s one-dimensional derivative along its axis.
    Built without the operator's matrix-free ``apply`` over the grid; small grids only.

    Parameters
    ----------
    rows : LocalRows
        ``constraint.rows(shape)`` of a local constraint (``cl.DivergenceFree``,
        ``cl.Continuity``, ``cl.LinearPDE``).

    Returns
    -------
    Tensor
        shape: (prod(grid), channels * prod(grid)), float64.
    """
    op = rows.operator
    grid = op.grid
    m = math.prod(grid)
    blocks = [torch.zeros(m, m, dtype=F64) for _ in range(op.shape[0])]
    for term, d1 in zip(op.terms, op.ops):
        factors = [
            d1.dense().to(F64).contiguous() if a == term.axis else torch.eye(n, dtype=F64)
            for a, n in enumerate(grid)
        ]
        blocks[term.channel] = blocks[term.channel] + term.coefficient * functools.reduce(
            torch.kron, factors
        )
    return torch.cat(blocks, 1)


def local_as_rows(rows: Any) -> Rows:
    """Local rows as sparse :class:`~constraint_layers.rows.Rows` (their dense ``C`` from
    :func:`dense_local`, each row's non-zero entries first, padded with zeros), rhs (batch, M)."""
    C = dense_local(rows)
    nonzero = C != 0
    k = max(int(nonzero.sum(1).max()), 1)
    index = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :k]
    rhs = rows.rhs.to(F64).reshape(rows.rhs.shape[0], -1)
    return Rows(index, C.gather(1, index), rhs)


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

    Bounds (``cl.Bounds``): the same problems with the bounds as inequalities, solved by
    ``dense_qp`` (checked against the KKT conditions). Deterministic: ``v`` minimises
    ``|v - u|^2`` on ``G S v = b - G f`` with every value of ``S v + f`` in the bounds, and the
    result is ``S v + f``. Gaussian: the mean minimises ``(x - u)^T Sigma^{-1} (x - u)`` (the
    identity with ``metric="euclidean"``) on all rows stacked, within the bounds; the variance is
    the equality-only one (``variance="rows"``, or ``metric="euclidean"``) or, with
    ``variance="active"``, the conditioning on the rows and on the active bounds held as
    equalities (0 there).
    """
    bounds = [c for c in constraints if c.family == "bounds"]
    if bounds:
        rest = [c for c in constraints if c.family != "bounds"]
        opts = dict(grid=grid, lift=lift, noise=noise, metric=metric, grid_shape=grid_shape,
                    inputs=inputs)  # fmt: skip
        return _bounded_reference(pred, rest, bounds, **opts)
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
            # Gp^T (Gp Gp^T)^+ = Gp^+, by the SVD of Gp itself: its condition number, not its
            # square (local rows, one per node, are ill-conditioned enough for that to matter)
            z = step(u - (torch.linalg.pinv(Gp) @ r.unsqueeze(-1)).squeeze(-1))
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


def _dense_metric(pred: Gaussian, batch: int, n: int) -> Tensor | None:
    """The prediction's dense covariance (batch, N, N) float64 (None: deterministic)."""
    var = None if pred.variance is None else pred.variance.reshape(batch, n).to(F64)
    if pred.low_rank is not None:
        L = pred.low_rank.to(F64).reshape(-1, n, pred.low_rank.shape[-1])
        cov = L @ L.mT + (torch.diag_embed(var) if var is not None else 0.0)
        return cov.expand(batch, n, n)
    if pred.covariance is not None:
        cov = pred.covariance
        cov = cov.to_dense() if hasattr(cov, "to_dense") else cov
        return torch.as_tensor(cov).to(F64).reshape(-1, n, n).expand(batch, n, n)
    return None if var is None else torch.diag_embed(var)


def _boundary_affine(brows: Sequence[Rows], batch: int, n: int) -> tuple[Tensor, Tensor]:
    """``(S, f)`` of the dense boundary step ``B(v) = S v + f``: (N, N) and (batch, N)."""
    eye = torch.eye(n, dtype=F64)
    if not brows:
        return eye, torch.zeros(batch, n, dtype=F64)
    zero = [r._replace(rhs=torch.zeros_like(r.rhs[:1])) for r in brows]
    S = dense_projection(eye, zero, sequential=True).mT
    f = dense_projection(torch.zeros(batch, n, dtype=F64), brows, sequential=True)
    return S, f


def _box_rows(
    M: Tensor, f: Tensor, lo: Tensor | None, hi: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """Inequality rows stating ``lo <= M v + f <= hi`` and the entry of each (infinite bounds
    are rows that bind nothing)."""
    rows, rhs, entry = [], [], []
    every = torch.arange(M.shape[0])
    if lo is not None:
        rows.append(M)
        rhs.append(lo - f)
        entry.append(every)
    if hi is not None:
        rows.append(-M)
        rhs.append(f - hi)
        entry.append(every)
    if not rows:
        return M[:0], f[:0], every[:0]
    return torch.cat(rows), torch.cat(rhs), torch.cat(entry)


def _bounded_reference(
    pred: Gaussian,
    constraints: Sequence[Any],
    bounds: Sequence[Any],
    *,
    grid: GridSpec,
    lift: int,
    noise: Any,
    metric: str,
    grid_shape: Sequence[int] | None,
    inputs: Any,
) -> tuple[Tensor, Tensor | None]:
    """:func:`reference_prediction` with bounds: the dense QP per sample (see there)."""
    from ..bounds import resolve_bounds

    k = pred.event_ndim
    mean = pred.mean
    shape = grid_view(mean, k, grid_shape, "reference_prediction")
    B, n = shape[0], math.prod(shape[1:])
    u = mean.reshape(B, n).to(F64)
    lo, hi = resolve_bounds(bounds, shape, dtype=mean.dtype, device=mean.device, inputs=inputs,
                            flat_shape=tuple(mean.shape), call="reference_prediction")  # fmt: skip
    lo = None if lo is None else lo.reshape(B, n).to(F64)
    hi = None if hi is None else hi.reshape(B, n).to(F64)
    deterministic = pred.variance is None and pred.covariance is None and pred.low_rank is None
    brows, crows = rows_of(constraints, shape, grid=grid, inputs=inputs, include_overridden=True,
                           lift=lift if deterministic else 0)  # fmt: skip
    G, b = _stack_dense(crows, B, n) if crows else (
        torch.zeros(B, 0, n, dtype=F64), torch.zeros(B, 0, dtype=F64))  # fmt: skip
    S, f = _boundary_affine(brows, B, n)
    out = []
    if deterministic:
        for s in range(B):
            A, c, _ = _box_rows(S, f[s], _at(lo, s), _at(hi, s))
            v = dense_qp(u[s], G[s] @ S, b[s] - G[s] @ f[s], A, c)
            out.append(S @ v + f[s])
        return torch.stack(out).reshape(mean.shape), None
    eye = torch.eye(n, dtype=F64)
    E = torch.cat([(eye - S).expand(B, n, n), G], -2) if brows else G
    e = torch.cat([f, b], -1) if brows else b
    cov = _dense_metric(pred, B, n)
    _, var_eq = reference_prediction(pred, constraints, grid=grid, noise=noise, metric=metric,
                                     grid_shape=grid_shape, inputs=inputs)  # fmt: skip
    act = torch.zeros(B, n, dtype=torch.bool)
    for s in range(B):
        A, c, entry = _box_rows(eye, torch.zeros(n, dtype=F64), _at(lo, s), _at(hi, s))
        W = None if metric == "euclidean" else cov[s]
        xs, held = _dense_qp(u[s], E[s], e[s], A, c, W)
        out.append(xs)
        act[s, entry[held]] = True
    x = torch.stack(out)
    if metric == "euclidean" or all(getattr(c, "variance", "rows") == "rows" for c in bounds):
        return x.reshape(mean.shape), var_eq
    act &= cov.detach().diagonal(dim1=-2, dim2=-1) > 0  # the QP's active bounds
    variances = []
    for s in range(B):
        idx = act[s].nonzero().flatten()
        unit = eye[idx]
        rows = torch.cat([E[s], unit]).unsqueeze(0)
        rhs = torch.cat([e[s], x[s, idx]]).unsqueeze(0)
        _, post = dense_update(x[s : s + 1], rows, rhs, covariance=cov[s : s + 1])
        variances.append(post[0].diagonal().masked_fill(act[s], 0.0))
    return x.reshape(mean.shape), torch.stack(variances).reshape(mean.shape)


def _at(t: Tensor | None, s: int) -> Tensor | None:
    return None if t is None else t[s]


def _stack_dense(rows: Sequence[Rows], batch: int, n: int) -> tuple[Tensor, Tensor]:
    s = Rows.stack(rows, batch)
    G = s.dense(n)
    return (G if G.ndim == 3 else G.expand(batch, *G.shape)), s.rhs
