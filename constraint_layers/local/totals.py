"""Totals (a few dense rows, ``G u = b``) next to local rows: the Schur complement over the local
solver (one local solve per total, then an ``M x M`` solve)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .solve import INVOLVED_RTOL, NULL_RTOL

__all__ = ["solve_small", "with_totals", "with_totals_step"]

F64 = torch.float64


def dense_totals(totals, shape, grid, inputs, device) -> tuple[Tensor, Tensor, list[str]]:
    """The totals' rows on an output of ``shape``, dense: ``(G, b, labels)``, ``G`` float64
    (M, n) when every sample shares them, else (batch, M, n); ``b`` (batch, M); one label per
    row for the messages."""
    from ..rows import Rows

    parts = [c.rows(shape, grid=grid, inputs=inputs) for c in totals]
    stacked = Rows.stack(parts, shape[0])
    G = stacked.dense(math.prod(shape[1:])).to(device)
    labels = [f"{c!r} row {i}" for c, p in zip(totals, parts) for i in range(p.num_rows)]
    return G, stacked.rhs.to(device), labels


def with_totals(u1, local_projection, mask, totals, grid, inputs, dtype, call) -> Tensor:
    """Totals ``G u = b`` (a few dense rows) on top of the local rows, by the Schur complement
    over the local solver: ``u = u1 - V mu`` with ``V = P0(M G^T)`` (each row, as a field on the
    free nodes, projected onto the null space of the local rows: one local solve per row) and
    ``(G V) mu = G u1 - b``. The Euclidean projection onto all rows at once (float64)."""
    from .._tolerance import tolerance

    shape = tuple(u1.shape)
    n = math.prod(shape[1:])
    G, b, labels = dense_totals(totals, shape, grid, inputs, u1.device)
    lead = G.shape[:-2]
    fields = G.reshape(-1, *shape[1:])
    if mask is not None:
        fields = fields * mask
    zero = torch.zeros((fields.shape[0], *shape[2:]), dtype=F64, device=u1.device)
    V = local_projection(fields, zero, False).reshape(*lead, G.shape[-2], n)
    flat = u1.reshape(shape[0], n)
    if G.ndim == 2:
        r = flat @ G.T - b
        A = G @ V.T
        scale = flat.abs() @ G.abs().T + b.abs()
    else:
        r = (G @ flat.unsqueeze(-1)).squeeze(-1) - b
        A = G @ V.mT
        scale = (G.abs() @ flat.abs().unsqueeze(-1)).squeeze(-1) + b.abs()
    A = 0.5 * (A + A.mT)
    mu = solve_small(A, r, scale, tolerance(dtype).residual, labels, call)
    step = mu @ V if V.ndim == 2 else (mu.unsqueeze(-2) @ V).squeeze(-2)
    return (flat - step).reshape(shape)


def with_totals_step(v1, project0, affine, step, totals, grid, inputs, dtype, call) -> Tensor:
    """Totals ``G B(v) = b`` next to local rows on the freedom of a boundary step
    ``B(v) = S v + g`` (Neumann, periodic or lifted walls): in the step's variable ``v``, the rows
    ``G S`` with the Schur complement over the local projection ``project0`` (one local solve
    per total and sample): ``v = v1 - V mu``, ``V = P0(S^T G^T)``, ``(G S V) mu = G B(v1) - b``.
    Returns ``v`` (float64; the caller applies ``B``)."""
    from .._tolerance import tolerance

    shape = tuple(v1.shape)
    batch, n = shape[0], math.prod(shape[1:])
    G, b, labels = dense_totals(totals, shape, grid, inputs, v1.device)
    G = G.expand(batch, *G.shape[-2:]) if G.ndim == 2 else G  # (batch, M, n)
    m = G.shape[1]
    fields = []
    for i in range(m):  # S^T g_i per sample, then its part off the local rows' span
        g = G[:, i].reshape(shape)
        x = torch.zeros_like(g, requires_grad=True)
        with torch.enable_grad():
            (st,) = torch.autograd.grad(step(x), x, g)
        fields.append(project0(st))
    V = torch.stack(fields, 1).reshape(batch, m, n)  # (batch, M, n)
    SV = torch.stack([step(V[:, j].reshape(shape)).reshape(batch, n) for j in range(m)], 1)
    A = G @ SV.mT
    A = 0.5 * (A + A.mT)
    out1 = affine(v1).reshape(batch, n)
    r = (G @ out1.unsqueeze(-1)).squeeze(-1) - b
    scale = (G.abs() @ out1.abs().unsqueeze(-1)).squeeze(-1) + b.abs()
    mu = solve_small(A, r, scale, tolerance(dtype).residual, labels, call)
    return v1 - (mu.unsqueeze(-2) @ V).squeeze(-2).reshape(shape)


def solve_small(A: Tensor, r: Tensor, scale: Tensor, tol: float, labels, call: str) -> Tensor:
    """``A^+ r`` for the small symmetric PSD Schur complement (*, M, M); a residual left where
    ``A`` vanishes (a total the local rows and walls fix) must be below ``tol * scale``."""
    from ..errors import IncompatibleConstraintsError

    lam, Q = torch.linalg.eigh(A)
    keep = lam > NULL_RTOL * lam.amax(-1, keepdim=True).clamp_min(torch.finfo(F64).tiny)
    rq = (Q.mT @ r.unsqueeze(-1)).squeeze(-1)
    off = torch.where(keep, 0.0, rq).abs()
    if bool((off > tol * (scale.amax(-1, keepdim=True) + torch.finfo(F64).tiny)).any()):
        weight = (Q * (~keep).unsqueeze(-2)).abs().amax(-1).reshape(-1, Q.shape[-1])
        which = sorted({int(i) for i in (weight > INVOLVED_RTOL).any(0).nonzero()})
        names = ", ".join(labels[i] for i in which[:6]) + (" ..." if len(which) > 6 else "")
        raise IncompatibleConstraintsError(
            f"{call}: the totals cannot hold with the local rows and the walls: {names} are fixed "
            f"by them to other values (off by {float(off.max()):.3e}). Check the totals.",
            tuple(which),
        )
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    return (Q @ (inv * rq).unsqueeze(-1)).squeeze(-1)
