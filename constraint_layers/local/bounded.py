"""Box bounds with local rows (deterministic outputs, Euclidean): the point closest to the
prediction that satisfies the local rows, the Dirichlet walls and ``lower <= u <= upper``.

A primal-dual active-set search over the local solver: the nodes at a bound are held there as
if they were Dirichlet nodes, the others move by the masked projection
(:func:`~constraint_layers.local.implicit.project_cg`); a held node whose multiplier
``nu = u - z + (C^T lam)`` (lower; the opposite sign for upper) turns negative is released, a
free node outside its bounds is held. It stops when the active set repeats (finite: the KKT
conditions hold exactly there) and raises if it cycles or runs out of :data:`MAX_SWEEPS`. The
result is the masked projection with the final active set, differentiable (the implicit function
theorem on the active set). One sample at a time (each has its own active set).

Totals ``G u = b`` in the same call: the multipliers are those of the rows ``[C; G]``
(``nu = u - z + C^T lam + G^T mu``, the Schur complement over the local solve), and the result
is the masked projection followed by :func:`~constraint_layers.local.totals.with_totals`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tolerance import LOCAL_BOUND_RTOL
from ..errors import IncompatibleConstraintsError
from .implicit import project_cg
from .operator import LocalOperator
from .solve import System, _scale
from .totals import dense_totals

__all__ = ["MAX_SWEEPS", "project_local_bounded"]

F64 = torch.float64
#: The most active-set changes.
MAX_SWEEPS = 1000


def _multipliers(
    op: LocalOperator, z: Tensor, f: Tensor, free: Tensor, call: str,
    w: Tensor | None = None, tot=None,
) -> Tensor:  # fmt: skip
    """``A^T lambda`` of the masked projection of ``z`` (1, channels, *grid), no autograd, in the
    metric ``w`` (a diagonal variance, or None: Euclidean): ``C^T lam`` for the local rows; with
    totals ``tot = (G (M, n), b (M,), labels)`` (Euclidean only) the rows ``[C; G]`` (the Schur
    complement over the local solve, as :func:`~constraint_layers.local.totals.with_totals`)."""
    if tot is not None and w is not None:
        raise NotImplementedError(
            f"{call}: bounds with totals and local rows are solved in the Euclidean metric only."
        )
    system = System(op, free, w)
    lam, _ = system.solve(op.apply(z) - f, _scale(op, z, f), call)
    if tot is None:
        return op.transpose(lam)
    from .._tolerance import tolerance
    from .totals import solve_small

    G, b, labels = tot
    shape = z.shape[1:]
    u1 = z - system.move(lam)
    fields = G.reshape(-1, *shape) * free  # M g_i
    rhs = op.apply(fields)
    w, _ = system.solve(rhs, _scale(op, fields, rhs), call, check=False)
    V = (fields - system.move(w)).flatten(1)  # (M, n)
    A = G @ V.T
    flat = u1.flatten()
    r = G @ flat - b
    scale = G.abs() @ flat.abs() + b.abs()
    mu = solve_small(0.5 * (A + A.T), r, scale, tolerance(F64).residual, labels, call)
    return op.transpose(lam - (mu.reshape(-1, *[1] * (w.ndim - 1)) * w).sum(0, keepdim=True)) + (
        mu @ G
    ).reshape(1, *shape)


def check_walls_in_bounds(z, mask, lo, hi, bounds, call) -> None:
    """A Dirichlet wall value outside the bounds raises (nothing can move it)."""
    if mask is None:
        return
    fixed = z.detach().to(F64)
    bad = torch.zeros_like(fixed, dtype=torch.bool)
    if lo is not None:
        bad |= (fixed < lo.detach()) & ~mask
    if hi is not None:
        bad |= (fixed > hi.detach()) & ~mask
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        raise ValueError(
            f"{call}: the wall value {float(fixed[idx])!r} at index {idx} is outside the "
            f"bounds {list(bounds)}; nothing can move a Dirichlet value."
        )


def project_local_bounded(
    op: LocalOperator,
    z: Tensor,
    f: Tensor,
    walls: Tensor | None,
    lower: Tensor | None,
    upper: Tensor | None,
    call: str,
    weight: Tensor | None = None,
    totals: tuple | None = None,
) -> Tensor:
    """``argmin |u - z|`` s.t. ``C u = f``, the wall nodes (``walls`` False) as in ``z``, and the
    bounds; float64 ``z`` (batch, channels, *grid), bounds broadcastable to it (or None).
    ``weight`` (z's shape, > 0 on the free nodes): the metric ``|u - z|^2_{W^-1}`` (a diagonal
    variance; the multipliers become ``nu = W^-1 (u - z) + C^T lam``). ``totals``:
    ``(constraints, grid, inputs)`` of totals ``G u = b`` held too (Euclidean only)."""
    if weight is not None and totals:
        raise NotImplementedError(
            f"{call}: bounds with totals and local rows on a Gaussian output (the variance "
            "metric) are not supported; deterministic outputs take them."
        )
    shape = z.shape[1:]
    free0 = torch.ones(shape, dtype=torch.bool, device=z.device) if walls is None else walls
    lo = None if lower is None else torch.broadcast_to(lower.to(F64), z.shape)
    hi = None if upper is None else torch.broadcast_to(upper.to(F64), z.shape)
    dense = None
    if totals:
        cons, grid, inputs = totals
        dense = dense_totals(cons, tuple(z.shape), grid, inputs, z.device)
    out = []
    for b in range(z.shape[0]):
        w = None if weight is None else weight[b : b + 1].to(F64)
        tot = None
        if dense is not None:
            G, rhs, labels = dense
            tot = (G if G.ndim == 2 else G[b], rhs[b], labels)
        out.append(_one(op, z[b : b + 1], f[b : b + 1], free0, lo, hi, b, call, w, tot, totals))
    return torch.cat(out)


def _one(op, z, f, free0, lo, hi, b, call: str, w=None, tot=None, totals=None) -> Tensor:
    lo_b = None if lo is None else lo[b : b + 1].detach()
    hi_b = None if hi is None else hi[b : b + 1].detach()
    zd = z.detach()
    at_lo = torch.zeros_like(zd, dtype=torch.bool)
    at_hi = torch.zeros_like(zd, dtype=torch.bool)
    seen: set[bytes] = set()
    single = False  # after a cycle: one change at a time
    for _ in range(MAX_SWEEPS):
        wd = None if w is None else w.detach()
        state = _state(op, zd, f.detach(), free0, at_lo, at_hi, lo_b, hi_b, call, wd, tot)
        if state is None:  # the held nodes leave no solution: hold fewer
            if not single:
                single, at_lo, at_hi = True, *_fewer(at_lo, at_hi)
                continue
            raise IncompatibleConstraintsError(
                f"{call}: the bounds and the local rows cannot hold together (sample {b})."
            )
        viol_lo, viol_hi, neg_lo, neg_hi = state
        if not bool(viol_lo.any() | viol_hi.any() | neg_lo.any() | neg_hi.any()):
            break  # KKT: every free node inside, every held multiplier >= 0
        key = (at_lo.cpu().numpy().tobytes(), at_hi.cpu().numpy().tobytes())
        if key in seen:
            single = True
        seen.add(key)
        if single:
            at_lo, at_hi = _one_change(at_lo, at_hi, viol_lo, viol_hi, neg_lo, neg_hi)
        else:
            at_lo = (at_lo & ~(neg_lo > 0)) | (viol_lo > 0)
            at_hi = (at_hi & ~(neg_hi > 0)) | (viol_hi > 0)
    else:
        raise IncompatibleConstraintsError(
            f"{call}: the active-set search for the bounds with the local rows did not settle "
            f"in {MAX_SWEEPS} changes (sample {b})."
        )
    target = z
    if lo is not None:
        target = torch.where(at_lo, lo[b : b + 1], target)
    if hi is not None:
        target = torch.where(at_hi, hi[b : b + 1], target)
    free = free0 & ~(at_lo | at_hi)[0]
    out = project_cg(op, target, f, mask=free, weight=w, call=call)
    if totals:
        from .totals import with_totals

        def local_projection(x: Tensor, rhs: Tensor, check: bool = True) -> Tensor:
            return project_cg(op, x, rhs, mask=free, call=call, check=check)

        cons, grid, inputs = totals
        out = with_totals(out, local_projection, free, cons, grid, inputs, F64, call)
    # free nodes inside to rounding (1e-12): clipped, so that every value is within its bounds
    if lo is not None:
        out = torch.where(free, torch.maximum(out, lo[b : b + 1]), out)
    if hi is not None:
        out = torch.where(free, torch.minimum(out, hi[b : b + 1]), out)
    return out


def _state(op, zd, f, free0, at_lo, at_hi, lo_b, hi_b, call, w=None, tot=None):
    """The violations of the free nodes and the negative multipliers of the held ones (as
    amounts, 0 where none), or None when the held nodes leave the rows no solution."""
    target = zd
    if lo_b is not None:
        target = torch.where(at_lo, lo_b, target)
    if hi_b is not None:
        target = torch.where(at_hi, hi_b, target)
    free = free0 & ~(at_lo | at_hi)[0]
    try:
        ct = _multipliers(op, target, f, free, call, w, tot)
    except IncompatibleConstraintsError:
        return None
    if w is not None:
        ct = w * ct  # W C^T lam: the move, and the multipliers' terms in units of u
    u = torch.where(free, target - ct, target)
    zero = torch.zeros_like(zd)
    viol_lo = viol_hi = neg_lo = neg_hi = zero
    if lo_b is not None:
        viol_lo = torch.where(free, (lo_b - u).clamp_min(0.0), 0.0)
        neg_lo = torch.where(at_lo, (zd - lo_b - ct).clamp_min(0.0), 0.0)  # -nu where < 0
    if hi_b is not None:
        viol_hi = torch.where(free, (u - hi_b).clamp_min(0.0), 0.0)
        neg_hi = torch.where(at_hi, (hi_b - zd + ct).clamp_min(0.0), 0.0)
    bounds = [t[t.isfinite()] for t in (lo_b, hi_b) if t is not None]
    scale = max([float(zd.abs().max())] + [float(t.abs().max()) for t in bounds if t.numel()])
    tol = LOCAL_BOUND_RTOL * max(scale, torch.finfo(zd.dtype).tiny)
    return tuple(torch.where(x > tol, x, 0.0) for x in (viol_lo, viol_hi, neg_lo, neg_hi))


def _fewer(at_lo: Tensor, at_hi: Tensor) -> tuple[Tensor, Tensor]:
    return torch.zeros_like(at_lo), torch.zeros_like(at_hi)


def _one_change(at_lo, at_hi, viol_lo, viol_hi, neg_lo, neg_hi):
    """Release the most negative multiplier, else hold the most violated free node."""
    neg = torch.maximum(neg_lo, neg_hi)
    if bool(neg.any()):
        i = int(neg.flatten().argmax())
        at_lo, at_hi = at_lo.clone(), at_hi.clone()
        at_lo.view(-1)[i] = False
        at_hi.view(-1)[i] = False
        return at_lo, at_hi
    viol = torch.maximum(viol_lo, viol_hi)
    i = int(viol.flatten().argmax())
    at_lo, at_hi = at_lo.clone(), at_hi.clone()
    if float(viol_lo.view(-1)[i]) > 0:
        at_lo.view(-1)[i] = True
    else:
        at_hi.view(-1)[i] = True
    return at_lo, at_hi
