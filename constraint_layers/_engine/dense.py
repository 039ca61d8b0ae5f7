"""Few dense rows, with or without face-local rows: the joint solvers of the engine (private).

All constraints are rows of ``C u = d`` (:mod:`constraint_layers.rows`); the constrained output is

    u~ = u - W C^T (C W C^T)^{-1} (C u - d)

with a mobility ``W`` chosen by what the output is and which rows act. The dispatcher
(:mod:`constraint_layers._engine.dispatch`) reads the rows' structure tags and calls the solvers
here (:func:`with_walls`, :func:`condition_rows`) or the bounded and local ones:

==========================  ===============================================================
what acts                   solver
==========================  ===============================================================
boundary rows only,         face-local step (:mod:`constraint_layers.boundary.enforce`):
deterministic output        each row moves its own nodes; Dirichlet exact to the bit
conservation rows only      :func:`~constraint_layers.functional.enforce_conservation`: one-row
                            streaming per frame, or the ``M x M`` Cholesky with polish
boundary + conservation,    the boundary step ``B`` (affine: ``B(v) = S v + f``) first; the
deterministic output        conservation rows act on the remaining freedom with the boundary
                            substituted, ``G' = G S``, ``b' = b - G f``, Euclidean:
                            ``u~ = B(u - G'^T (G' G'^T)^+ (G B(u) - b))``
any rows, Gaussian output   conditioning on ALL rows at once (boundary rows at the face points
                            each condition is in charge of, then the conservation rows):
                            :func:`~constraint_layers.functional.condition_gaussian`
bounds (``cl.Bounds``)      the equality-only result first, returned unchanged when it lies in
with any of the above       the bounds; else the bounded step of
                            :mod:`constraint_layers._engine.bounded.joint`
==========================  ===============================================================

Rows that cannot hold together raise :class:`~constraint_layers.errors.IncompatibleConstraintsError`
naming them; redundant rows whose right-hand sides agree are accepted.
:func:`~constraint_layers._engine.reference.dense_projection` is the float64 reference the tests
compare every path with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._grid import resolve_spacing
from .._tolerance import CULPRIT_FRACTION, REACH_RTOL, tolerance
from ..conservation.constraint import Conservation
from ..conservation.gaussian import Gaussian
from ..errors import IncompatibleConstraintsError
from ..rows import DEFAULT_GRID, GridSpec
from .dependence import data_rounding, describe_rows, independent_rows
from .faces import apply_plan, condition_rhs, plan
from .gaussian import condition_gaussian
from .rowops import noise_per_row as _noise_rows
from .rowops import pull_back as _pull_back
from .rowops import row_labels as _labels
from .rowops import stack_dense as _stack
from .streaming import condition, flat_event, grid_view
from .tags import structure_of

__all__ = [
    "condition_rows",
    "is_deterministic",
    "with_walls",
]

F64 = torch.float64


def _may_depend(con: Sequence[Any]) -> bool:
    """Whether the conservation rows may depend on each other: several constraints, or one
    general matrix of several rows (one integral's rows touch disjoint values)."""
    if len(con) > 1:
        return True
    c = con[0]
    return structure_of(c) != "frame" and (c.num_rows or 0) > 1


def _without_dependent_rows(con, mean, k, grid_shape, inputs, call) -> Sequence[Any]:
    """Exact conservation rows without the ones that follow from the others to rounding (their
    values must agree: else :class:`IncompatibleConstraintsError` names them), as for joint
    rows."""
    shape = grid_view(mean, k, grid_shape, call)
    rows = [c.rows(shape, inputs=inputs) for c in con]
    G, b = _stack(rows, shape[0], math.prod(shape[1:]))
    labels = _labels(con, [r.num_rows for r in rows])
    eps_rows, eps_rhs = data_rounding(con, mean.dtype)
    if G.ndim == 2:
        Gk, bk = independent_rows(G, b, labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs)
        return con if Gk is G else [Conservation(Gk, bk)]
    # rows per sample: each sample's own decision; one system when the ranks agree (else the
    # solver meets the dependent rows and says so)
    views = list(G.unbind(0))
    parts = [
        independent_rows(g, b[s : s + 1], labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs)
        for s, g in enumerate(views)
    ]
    if all(Gk is g for g, (Gk, _) in zip(views, parts)):
        return con
    if len({Gk.shape[0] for Gk, _ in parts}) > 1:
        return con
    return [Conservation(torch.stack([Gk for Gk, _ in parts]), torch.cat([bk for _, bk in parts]))]


def _solve_consistent(
    A: Tensor, r: Tensor, scale: Tensor, tol: float, labels: Sequence[str], call: str
) -> Tensor:
    """``A^+ r`` for ``A`` (*, M, M) symmetric PSD, ``r`` (*, M); dependent rows must agree.

    ``scale`` (*, M): the size of the terms each residual balances; a residual left in a
    direction no move can reach must stay below ``tol`` times it (rounding of the output dtype).
    """
    L, info = torch.linalg.cholesky_ex(A)
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    if not bool((info != 0).any()):
        ratio = L.detach().diagonal(dim1=-2, dim2=-1).square() / diag.clamp_min(1e-300)
        if bool((ratio > REACH_RTOL).all()):
            return torch.cholesky_solve(r.unsqueeze(-1), L).squeeze(-1)
    lam, V = torch.linalg.eigh(A)
    keep = lam > REACH_RTOL * lam.amax(-1, keepdim=True).clamp_min(1e-300)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)
    rv = (V.mT @ r.unsqueeze(-1)).squeeze(-1)
    off = torch.where(keep, 0.0, rv).abs()  # residual in the directions no move can reach
    if bool((off > tol * scale.amax(-1, keepdim=True)).any()):
        weight = (V * (~keep).unsqueeze(-2)).abs().amax(-1)  # rows in the unreachable directions
        weight = weight.reshape(-1, weight.shape[-1])
        named = weight > CULPRIT_FRACTION * weight.amax(-1, keepdim=True)
        which = sorted({int(i) for i in named.any(0).nonzero()})
        raise IncompatibleConstraintsError(
            f"{call}: the constraints cannot hold together: {describe_rows(labels, which)} "
            "cannot be met once the boundary conditions hold (residual "
            f"{float(off.detach().max()):.3e} in a direction no free value can change). Check "
            "the values and totals (e.g. a total that the wall values make impossible).",
            tuple(which),
        )
    return (V @ (inv * rv).unsqueeze(-1)).squeeze(-1)


def condition_rows(
    pred: Gaussian,
    con: Sequence[Any],
    *,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    call: str = "project",
) -> Gaussian:
    """Conservation rows without boundary rows: rows that follow from the others dropped (their
    values must agree), then conditioning (:func:`~constraint_layers._engine.streaming.condition`:
    one-row updates per frame, or the stacked rows through the Gaussian kernel)."""
    k = pred.event_ndim
    mean = pred.mean
    if _may_depend(con) and not isinstance(noise, (list, tuple, Tensor)) and noise == 0:
        con = _without_dependent_rows(con, mean, k, grid_shape, inputs, call)
    if isinstance(noise, (list, tuple)):  # one value per constraint: one per row
        shape = grid_view(mean, k, grid_shape, call)
        counts = [c.rows(shape, inputs=inputs).num_rows for c in con]
        noise = _noise_rows(noise, [], counts)
    return condition(  # the layer checked the output already
        mean,
        con,
        variance=pred.variance,
        covariance=pred.covariance,
        low_rank=pred.low_rank,
        noise=noise,
        metric=metric,
        event_ndim=k,
        grid_shape=grid_shape,
        inputs=inputs,
    )


def with_walls(
    pred: Gaussian,
    bnd: Sequence[Any],
    con: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    lift: int = 0,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    call: str = "project",
) -> Gaussian:
    """Boundary rows (face-local) and conservation rows (few, dense) on one prediction.

    Deterministic: the face-local step ``B``, and the conservation rows on the freedom it leaves
    (:func:`_joint_deterministic`). Gaussian: conditioning on all rows at once
    (:func:`_joint_gaussian`).
    """
    k = pred.event_ndim
    mean = pred.mean
    shape = grid_view(mean, k, grid_shape, call)
    lead = mean.shape[: mean.ndim - k]
    hs = resolve_spacing(
        shape[2:], spacing=grid.spacing, extent=grid.extent, endpoint=grid.endpoint, call=call
    )
    if is_deterministic(pred):
        bplan = plan(shape, bnd, hs, lift, grid.endpoint, call)
        rhs = [
            condition_rhs(c, bc, shape[0], mean.dtype, mean.device, inputs, call)
            for c, bc in zip(bplan.conds, bnd)
        ]
        u = mean.reshape(shape)
        z = apply_plan(u, bplan, rhs)
        if con:
            z = _joint_deterministic(u, z, bplan, rhs, con, shape, inputs, call)
        return Gaussian(z.reshape(mean.shape), event_ndim=k)
    plan(shape, bnd, hs, lift, grid.endpoint, call)  # one condition per face (cached; checks)
    return _joint_gaussian(pred, bnd, con, shape, lead, hs, grid, noise, metric, inputs, call)


def is_deterministic(pred: Gaussian) -> bool:
    """Whether a prediction record carries no uncertainty (no variance, covariance, low rank)."""
    return pred.variance is None and pred.covariance is None and pred.low_rank is None


def _joint_deterministic(u, z1, bplan, rhs, con, shape, inputs, call) -> Tensor:
    """Conservation rows on the freedom the boundary step leaves (Euclidean), then the step.

    ``B(v) = S v + f``: the rows ``G B(v) = b`` read ``G' v = b'`` with ``G' = G S`` and
    ``b' = b - G f``. Rows that depend on the others there (a total that reads only wall values,
    a repeated total) are dropped when their values agree, and named when they do not
    (:func:`~constraint_layers._dependence.independent_rows`, at rounding).
    """
    n = math.prod(shape[1:])
    rows = [c.rows(shape, inputs=inputs) for c in con]
    G, b = _stack(rows, shape[0], n)
    G = G.to(u.device)
    b = b.to(u.device)
    Gp = _pull_back(G, bplan, shape)  # (M, N) or (B, M, N)
    f = apply_plan(torch.zeros_like(u), bplan, rhs).reshape(shape[0], -1).to(F64)
    bp = b - (f @ G.mT if G.ndim == 2 else (G @ f.unsqueeze(-1)).squeeze(-1))
    labels = _labels(con, [x.num_rows for x in rows])
    eps_rows, eps_rhs = data_rounding(con, u.dtype)
    tol = tolerance(u.dtype).residual
    flat = u.reshape(shape[0], -1).to(F64)
    if Gp.ndim == 2:
        Gk, bk = independent_rows(Gp, bp, labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs)
        step = _reduced_step(flat, Gk, bk, tol, labels, call)
    else:  # rows per sample: each its own decision
        parts = []
        for s in range(shape[0]):
            Gk, bk = independent_rows(
                Gp[s], bp[s : s + 1], labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs
            )
            parts.append(_reduced_step(flat[s : s + 1], Gk, bk, tol, labels, call))
        step = torch.cat(parts)
    v = (flat - step).to(u.dtype).reshape(shape)
    return apply_plan(v, bplan, rhs)


def _reduced_step(flat: Tensor, Gk: Tensor, bk: Tensor, tol: float, labels, call) -> Tensor:
    """``Gk^T (Gk Gk^T)^+ (Gk u - bk)``: the Euclidean step onto the (independent) rows."""
    r = flat @ Gk.mT - bk
    scale = flat.abs() @ Gk.abs().mT + bk.abs() + torch.finfo(F64).tiny
    coef = _solve_consistent(Gk @ Gk.mT, r, scale, tol, labels, call)  # (B, R)
    return coef @ Gk


def _fixed_point_rows(
    bplan: Any, bnd: Sequence[Any], shape: tuple[int, ...], rhs: Sequence[Tensor]
):
    """The boundary constraint set as rows: the outputs the boundary step leaves unchanged.

    ``B(v) = S v + f`` is a projection; its fixed points satisfy ``(I - S)_i u = f_i`` for every
    node ``i`` it moves. These rows state exactly what the deterministic step enforces (the later
    condition at corners, both ends of every periodic pair, ...). Grouped by the condition that
    moves the node last. Returns ``(C, d, counts, labels, fixed)``: (K, N), (batch, K) float64,
    and the nodes set to a value whatever the input.
    """
    cached = bplan.derived.get("fixed_point_rows")  # the structure part: once per plan
    if cached is None:
        owner: dict[int, int] = {}
        for i, c in enumerate(bplan.conds):
            for node in c.moves.flatten().tolist():
                owner[node] = i
        nodes = sorted(owner, key=lambda j: (owner[j], j))
        n = math.prod(shape[1:])
        E = torch.zeros((len(nodes), n), dtype=F64)
        E[torch.arange(len(nodes)), torch.tensor(nodes)] = 1.0
        C = E - _pull_back(E, bplan, shape)
        counts = [sum(1 for j in nodes if owner[j] == i) for i in range(len(bplan.conds))]
        # nodes the step sets to a value whatever the input (Dirichlet): no variance left there
        fixed = torch.tensor(nodes, dtype=torch.long)[(C - E).abs().sum(-1) == 0]
        cached = (C, nodes, [owner[j] for j in nodes], counts, fixed)
        bplan.derived["fixed_point_rows"] = cached
    C, nodes, owners, counts, fixed = cached
    zero = torch.zeros((shape[0], *shape[1:]), dtype=F64)
    f = apply_plan(zero, bplan, [r.to(F64).cpu() for r in rhs]).reshape(shape[0], -1)
    d = f[:, nodes]
    labels = [f"{bnd[i]!r} at flat position {j}" for i, j in zip(owners, nodes)]
    return C, d, counts, labels, fixed


def _joint_gaussian(pred, bnd, con, shape, lead, hs, grid, noise, metric, inputs, call) -> Gaussian:
    """Condition the Gaussian on all rows at once: the boundary step's fixed points and the
    conservation rows; then the exact finish of the boundary rows."""
    n = math.prod(shape[1:])
    k = pred.event_ndim
    mean = pred.mean
    bplan = plan(shape, bnd, hs, 0, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, shape[0], mean.dtype, mean.device, inputs, call)
        for c, bc in zip(bplan.conds, bnd)
    ]
    rhs64 = [
        condition_rhs(c, bc, shape[0], F64, torch.device("cpu"), inputs, call)
        for c, bc in zip(bplan.conds, bnd)
    ]
    Cb, db, bcounts, blabels, fixed = _fixed_point_rows(bplan, bnd, shape, rhs64)
    crows = [c.rows(shape, inputs=inputs) for c in con]
    Gc, bc_ = _stack(crows, shape[0], n) if crows else (Cb[:0], db[:, :0])
    if Gc.ndim == 3:
        Cb = Cb.expand(shape[0], *Cb.shape)
    G = torch.cat([Cb, Gc], -2)
    b = torch.cat([db, bc_], -1)
    labels = [*blabels, *_labels(con, [r.num_rows for r in crows])]
    s = _noise_rows(noise, bcounts, [r.num_rows for r in crows])
    if G.ndim == 2 and not isinstance(s, Tensor):
        eps_rows, eps_rhs = data_rounding([*bnd, *con], mean.dtype)
        G, b = independent_rows(G, b, labels, call, eps_rows=eps_rows, eps_rhs=eps_rhs)
    G = G.to(mean.device)
    b = b.to(mean.device).reshape(*lead, -1)
    if G.ndim == 3:
        G = G.reshape(*lead, *G.shape[-2:])
    post = condition_gaussian(
        flat_event(mean, k),
        G,
        b,
        variance=flat_event(pred.variance, k),
        covariance=pred.covariance,
        low_rank=pred.low_rank,
        noise=s,
        metric=metric,
    )
    ev = mean.shape[mean.ndim - k :]
    out_mean = post.mean.reshape(shape)
    if not isinstance(s, Tensor) or not bool(s[: sum(bcounts)].any()):
        # exact walls: the face-local step finishes the boundary rows (Dirichlet to the bit);
        # the mean is already one of its fixed points to rounding: it moves by rounding only
        out_mean = apply_plan(out_mean, bplan, rhs)
    var = None
    if post.variance is not None:
        var = post.variance
        if fixed.numel() and metric == "covariance" and not isinstance(s, Tensor):
            var = var.index_fill(-1, fixed.to(var.device), 0.0)  # exactly 0, not rounding
        var = var.reshape(*lead, *ev)
    down = None
    if pred.covariance is not None and post.factor is not None:
        down = post.factor.to(post.mean.dtype)
    cov = post.used_covariance(pred.covariance)  # jittered or symmetrised by the PSD policy
    return Gaussian(out_mean.reshape(*lead, *ev), var, cov, None, down, k, post)
