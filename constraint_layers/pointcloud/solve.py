"""The projection on point clouds (private; the layer calls :func:`project_points`).

One sample is ``u`` of shape ``(P, C)``. The rows are of two structures:

- **local** (one point each): coordinate rows (``cl.Dirichlet(points=)``) and one normal row per
  point (``cl.NormalComponent``);
- **dense** (few): weighted integrals per channel and ``cl.Conservation(G, b)`` over the flattened
  cloud (point-major, ``p * C + c``).

With a diagonal metric ``W`` (the identity for deterministic outputs, the model's marginal
variance for a Gaussian with ``metric="covariance"``) the projection

    u~ = u - W C^T (C W C^T)^+ (C u - d)

is computed without forming ``C``:

1. coordinate rows eliminate their entries (``u[p, c] = g``, to the bit; the metric is zero there);
2. each normal row is solved in closed form at its point on the remaining channels:
   ``x = u - W n (n . u - g) / (n . W n)`` (nothing else moves);
3. the dense rows ``D`` act through the Schur complement over the local rows: with
   ``S = W_L`` the metric left after steps 1 and 2 (per point: ``W - W n n^T W / (n . W n)``),
   ``x~ = x - S D^T (D S D^T)^+ (D x - d)``: an ``M x M`` system, ``M`` the number of dense rows.

Cost ``O(P C M + M^3)``: linear in the number of points. The posterior marginal variance (Gaussian
outputs) is ``diag(S) - diag(S D^T (D S D^T)^+ D S)``, the same structure.

Anything else (bounds, a full or low-rank covariance, noisy rows, two normal rows at one point)
goes through the library's general engine with the rows written densely, then the coordinate rows
are finished exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._tolerance import REACH_RTOL, rank_cutoff, tolerance
from ..conservation.constraint import Conservation, IntegralConservation
from ..conservation.gaussian import Gaussian
from ..errors import GridError, IncompatibleConstraintsError
from .constraints import NormalComponent, PointIntegral, PointValue

__all__ = ["check_point_constraints", "project_points"]

F64 = torch.float64


def check_point_constraints(constraints: Sequence[Any], call: str) -> None:
    """Refuse constraints that are stated on grids, saying what to use on a point cloud."""
    for c in constraints:
        if c.family == "boundary":
            raise GridError(
                f"{call}: {c!r} is a condition on a face of a grid, but the model's output is a "
                "point cloud (batch, n_points, channels). On points use "
                "cl.Dirichlet(value, points=mask_or_indices) for prescribed values, or "
                "cl.NormalComponent(value, normals=..., points=..., channels=...) for a normal "
                "component."
            )
        if isinstance(c, IntegralConservation):
            raise GridError(
                f"{call}: {c!r} integrates over the axes of a grid, but the model's output is a "
                "point cloud. Use cl.Conservation.integral(total, weights=w) with quadrature "
                "weights per point (e.g. cl.pointcloud.voronoi_weights(points, box))."
            )
        if c.family not in ("points", "conservation", "bounds"):
            raise GridError(
                f"{call}: {c!r} ({c.family} constraint) is stated on grids; the model's output "
                "is a point cloud. Point clouds take cl.Dirichlet(points=), "
                "cl.NormalComponent, cl.Conservation.integral(weights=), cl.Conservation(G, b) "
                "over the flattened cloud (point-major) and cl.Bounds."
            )


def _cloud(x: Tensor | None, k: int, batch: int) -> Tensor | None:
    """``(*lead, P)`` or ``(*lead, P, C)`` as ``(batch, P, C)``."""
    if x is None:
        return None
    if k == 1:
        return x.reshape(batch, x.shape[-1], 1)
    return x.reshape(batch, *x.shape[-2:])


def project_points(
    pred: Gaussian,
    constraints: Sequence[Any],
    *,
    noise: Any = 0.0,
    metric: str = "covariance",
    inputs: Any = None,
    call: str = "project",
) -> Gaussian:
    """Enforce ``constraints`` on a point-cloud prediction; returns it in the same layout.

    ``pred.mean`` is ``(*lead, P, C)`` (``event_ndim`` 2) or ``(*lead, P)`` (one channel,
    ``event_ndim`` 1).
    """
    check_point_constraints(constraints, call)
    k = pred.event_ndim
    if k not in (1, 2):
        raise GridError(
            f"{call}: a point-cloud output is (batch, n_points, channels) or (batch, n_points); "
            f"got event shape {tuple(pred.mean.shape[pred.mean.ndim - k :])}."
        )
    mean = pred.mean
    lead = mean.shape[: mean.ndim - k]
    batch = math.prod(lead)
    u = _cloud(mean, k, batch)
    shape = tuple(u.shape)
    values = [c for c in constraints if isinstance(c, PointValue)]
    normals = [c for c in constraints if isinstance(c, NormalComponent)]
    dense = [c for c in constraints if c.family == "conservation" or isinstance(c, PointIntegral)]
    bounds = [c for c in constraints if c.family == "bounds"]
    fixed, gval = _fixed(values, shape, inputs, call, u.device)
    nrm = [c.resolve(shape, inputs, call) for c in normals]
    D, d = _dense(dense, shape, inputs, call, u.device)
    var = (
        None
        if pred.variance is None
        else _cloud(torch.broadcast_to(pred.variance, mean.shape), k, batch)
    )
    general = pred.covariance is not None or pred.low_rank is not None
    noisy = not (isinstance(noise, (int, float)) and float(noise) == 0.0)
    overlap = len(nrm) > 1 and bool(
        (
            torch.stack([torch.broadcast_to(a, (batch, shape[1])) for _, a, _ in nrm]).sum(0) > 1
        ).any()
    )
    if bounds or general or noisy or overlap:
        return _general(pred, u, fixed, gval, nrm, D, d, bounds, shape, lead, k,
                        noise, metric, inputs, call)  # fmt: skip
    W = None if var is None or metric == "euclidean" else var.to(F64)
    x, S, Rinv, SDt = _local_dense(u.to(F64), W, fixed, gval, nrm, D, d, u.dtype, call)
    out = torch.where(fixed, gval.to(F64), x).to(u.dtype)  # coordinate rows to the bit
    out_var = pred.variance
    if W is not None:
        v = S
        if SDt is not None:
            v = v - torch.einsum("bmpc,bmn,bnpc->bpc", SDt, Rinv, SDt)
        v = torch.where(fixed, 0.0, v.clamp_min(0))
        out_var = v.to(pred.variance.dtype).reshape(mean.shape)
    return Gaussian(out.reshape(mean.shape), out_var, None, None, None, k)


def _fixed(values, shape, inputs, call, device) -> tuple[Tensor, Tensor]:
    """Coordinate rows as ``(fixed, g)``: bool and float64 (batch, P, C); later wins."""
    fixed = torch.zeros(shape, dtype=torch.bool, device=device)
    g = torch.zeros(shape, dtype=F64, device=device)
    for c in values:
        f, v = c.resolve(shape, inputs, call)
        f = torch.broadcast_to(f.to(device), shape)
        g = torch.where(f, v.to(device), g)
        fixed = fixed | f
    return fixed, g


def _dense(dense, shape, inputs, call, device) -> tuple[Tensor | None, Tensor | None]:
    """Dense rows ``(D, d)``: float64 (batch|1, M, P, C) and (batch, M); None without any."""
    batch, n_points, n_ch = shape
    Ds, ds = [], []
    for c in dense:
        if isinstance(c, PointIntegral):
            Dc, dc = c.resolve(shape, inputs, call)
        else:  # cl.Conservation(G, b) over the flattened cloud (point-major)
            rows = c.rows(shape, inputs=inputs)
            Dc = rows.dense(n_points * n_ch)
            Dc = Dc.reshape(-1, rows.num_rows, n_points, n_ch)
            dc = rows.rhs
        Ds.append(Dc.to(device))
        ds.append(torch.broadcast_to(dc.to(device), (batch, dc.shape[-1])))
    if not Ds:
        return None, None
    lead = batch if any(x.shape[0] != 1 for x in Ds) else 1
    D = torch.cat([torch.broadcast_to(x, (lead, *x.shape[1:])) for x in Ds], 1)
    return D, torch.cat(ds, 1)


def _local_dense(u, W, fixed, gval, nrm, D, d, dtype, call):
    """Steps 1-3 of the module docstring in float64. Returns ``(x, diag S, A^+, S D^T)``."""
    batch, n_points, n_ch = u.shape
    tol = tolerance(dtype).residual
    free = ~fixed
    w = torch.ones_like(u) if W is None else W
    wf = torch.where(free, w, 0.0)  # the metric on the free entries
    x = torch.where(fixed, gval, u)
    scale = u.detach().abs().amax((-2, -1), keepdim=True) + gval.abs().amax((-2, -1), keepdim=True)
    ns = []
    for n, active, g in nrm:
        n = torch.broadcast_to(n, u.shape)
        active = torch.broadcast_to(active, (batch, n_points))
        nf = torch.where(free, n, 0.0)
        g = g - (n * torch.where(fixed, gval, 0.0)).sum(-1)  # fixed entries moved right
        K = (nf * wf * nf).sum(-1)  # (batch, P)
        # numerically zero (rank_cutoff of the row's full size): every channel it reads is held,
        # or carries no variance at the problem's scale
        full = (n * w * n).sum(-1)
        ok = active & (K > rank_cutoff(F64, full, n_ch))
        r = (nf * x).sum(-1) - g
        bad = active & ~ok & (r.detach().abs() > tol * (scale[..., 0] * n.abs().sum(-1) + g.abs()))
        if bool(bad.any()):
            p = int(bad.nonzero()[0, 1])
            raise IncompatibleConstraintsError(
                f"{call}: at point {p} the normal component cannot be met: the channels it "
                "reads are all held by cl.Dirichlet(points=) values that disagree with it "
                f"(off by {float(r.detach()[bad].abs().max()):.3e}).",
                (p,),
            )
        Ks = torch.where(ok, K, 1.0)
        x = x - torch.where(ok, r / Ks, 0.0).unsqueeze(-1) * wf * nf
        ns.append((nf, ok, Ks))
    S = wf
    for nf, ok, Ks in ns:
        S = S - torch.where(ok.unsqueeze(-1), (wf * nf).square() / Ks.unsqueeze(-1), 0.0)
    if D is None:
        return x, S, None, None
    SDt = wf.unsqueeze(1) * D  # (batch, M, P, C): S D_m^T, the metric applied to each dense row
    for nf, ok, Ks in ns:
        t = (nf.unsqueeze(1) * SDt).sum(-1, keepdim=True)  # n . W D_m per point
        SDt = SDt - torch.where(ok.unsqueeze(1).unsqueeze(-1), t / Ks[:, None, :, None], 0.0) * (
            wf * nf
        ).unsqueeze(1)
    A = torch.einsum("bmpc,bnpc->bmn", torch.broadcast_to(D, SDt.shape), SDt)
    r = torch.einsum("bmpc,bpc->bm", torch.broadcast_to(D, (batch, *D.shape[1:])), x) - d
    size = torch.einsum("bmpc,bpc->bm", torch.broadcast_to(D.abs(), (batch, *D.shape[1:])),
                        x.detach().abs()) + d.abs()  # fmt: skip
    Ainv = _pinv_consistent(A, r, size, tol, call)
    coef = (Ainv @ r.unsqueeze(-1)).squeeze(-1)
    x = x - torch.einsum("bm,bmpc->bpc", coef, torch.broadcast_to(SDt, (batch, *SDt.shape[1:])))
    return x, S, Ainv, torch.broadcast_to(SDt, (batch, *SDt.shape[1:]))


def _pinv_consistent(A: Tensor, r: Tensor, size: Tensor, tol: float, call: str) -> Tensor:
    """``A^+`` for ``A`` (batch, M, M) PSD; a residual in a direction no move reaches must be
    rounding (``tol`` of the terms it balances), else the rows are incompatible."""
    diag = A.detach().diagonal(dim1=-2, dim2=-1)
    tiny = torch.finfo(F64).tiny
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info != 0).any()):
        ratio = L.detach().diagonal(dim1=-2, dim2=-1).square() / diag.clamp_min(tiny)
        if bool((ratio > REACH_RTOL).all()):  # squared pivots well above the rows' dependence
            return torch.cholesky_inverse(L)
    lam, V = torch.linalg.eigh(A)
    keep = lam > REACH_RTOL * lam.amax(-1, keepdim=True).clamp_min(tiny)
    rv = (V.mT @ r.unsqueeze(-1)).squeeze(-1)
    off = torch.where(keep, 0.0, rv).abs()
    lim = tol * (V.abs().mT @ size.unsqueeze(-1)).squeeze(-1)
    if bool((off.detach() > lim).any()):
        raise IncompatibleConstraintsError(
            f"{call}: the constraints on the point cloud cannot hold together: the weighted "
            "integrals (or dense rows) are fixed by the point values and normal components, and "
            f"disagree with them (off by {float(off.detach().max()):.3e}). Check the totals "
            "against the values given at the points."
        )
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, torch.ones_like(lam)), 0.0)
    return V @ (inv.unsqueeze(-1) * V.mT)


def _rows(u, fixed, gval, nrm, D, d) -> tuple[Tensor, Tensor]:
    """Every row written densely over the flattened cloud (point-major): ``(G, b)`` float64
    (batch, M, P * C) and (batch, M). Coordinate rows for the entries held in some sample (zero
    in the samples that do not hold them), one normal row per point active in some sample, then
    the dense rows."""
    batch, n_points, n_ch = u.shape
    n = n_points * n_ch
    Gs, bs = [], []
    any_fixed = fixed.any(0).reshape(-1)
    if bool(any_fixed.any()):
        idx = any_fixed.nonzero().flatten()
        E = torch.zeros((batch, idx.numel(), n), dtype=F64, device=u.device)
        on = fixed.reshape(batch, -1)[:, idx].to(F64)
        E.scatter_(2, idx.expand(batch, -1).unsqueeze(-1), on.unsqueeze(-1))
        Gs.append(E)
        bs.append(gval.reshape(batch, -1)[:, idx] * on)
    for nv, active, g in nrm:
        pts = torch.broadcast_to(active, (batch, n_points)).any(0).nonzero().flatten()
        N = torch.zeros((batch, pts.numel(), n_points, n_ch), dtype=F64, device=u.device)
        nb = torch.broadcast_to(nv, (batch, *nv.shape[1:]))
        N[:, torch.arange(pts.numel()), pts] = nb[:, pts]
        Gs.append(N.reshape(batch, pts.numel(), n))
        bs.append(g[:, pts])
    if D is not None:
        Gs.append(torch.broadcast_to(D, (batch, *D.shape[1:])).reshape(batch, -1, n))
        bs.append(d)
    if not Gs:
        return u.new_zeros((batch, 0, n), dtype=F64), u.new_zeros((batch, 0), dtype=F64)
    return torch.cat(Gs, 1), torch.cat(bs, 1)


def _resolved(mean: Tensor, k: int, constraints, inputs, call):
    """The output as (batch, P, C) and every point row resolved: ``(u, G, b)``."""
    check_point_constraints(constraints, call)
    batch = math.prod(mean.shape[: mean.ndim - k])
    u = _cloud(mean, k, batch)
    shape = tuple(u.shape)
    values = [c for c in constraints if isinstance(c, PointValue)]
    normals = [c for c in constraints if isinstance(c, NormalComponent)]
    dense = [c for c in constraints if c.family == "conservation" or isinstance(c, PointIntegral)]
    fixed, gval = _fixed(values, shape, inputs, call, u.device)
    nrm = [c.resolve(shape, inputs, call) for c in normals]
    D, d = _dense(dense, shape, inputs, call, u.device)
    G, b = _rows(u, fixed, gval, nrm, D, d)
    return u, G, b


def point_residual(mean: Tensor, k: int, constraints, inputs, call: str) -> Tensor:
    """Signed residual ``G u - b`` of every point row, float64 (batch, M): coordinate rows, then
    normal rows, then the dense rows (as :func:`_rows` orders them)."""
    u, G, b = _resolved(mean, k, constraints, inputs, call)
    return (G @ u.reshape(u.shape[0], -1, 1).to(F64)).squeeze(-1) - b


def check_point_residual(mean: Tensor, k: int, constraints, inputs, call: str) -> None:
    """The debug check: every point row's residual within the residual tolerance, relative to
    the terms it balances."""
    from ..errors import ConstraintViolationError

    u, G, b = _resolved(mean, k, constraints, inputs, call)
    x = u.reshape(u.shape[0], -1, 1).to(F64)
    r = (G @ x).squeeze(-1) - b
    size = (G.abs() @ x.abs()).squeeze(-1) + b.abs() + torch.finfo(F64).tiny
    rel = (r.abs() / size).amax() if r.numel() else torch.zeros(())
    tol = tolerance(mean.dtype).residual
    if not float(rel) <= tol:
        raise ConstraintViolationError(
            f"{call}(debug=True): a point row has relative residual {float(rel):.3e} after the "
            f"projection (tolerance {tol:.1e} for {mean.dtype}). This is a bug: please report it "
            "with the constraints and the output shape."
        )


def _general(pred, u, fixed, gval, nrm, D, d, bounds, shape, lead, k, noise, metric, inputs, call):
    """The general engine on the rows written densely (point-major), then exact coordinates."""
    from .._project import project as engine_project

    batch, n_points, n_ch = shape
    if isinstance(noise, (list, tuple)) or (isinstance(noise, Tensor) and noise.numel() > 1):
        raise ValueError(
            f"{call}: on a point cloud, noise is one number (the constraint noise of the integral "
            f"and dense rows); got {noise!r}."
        )
    noise = float(noise)
    G, b = _rows(u, fixed, gval, nrm, D, d)
    n_dense = 0 if D is None else D.shape[1]
    if noise != 0.0:
        if n_dense == 0:
            raise ValueError(
                f"{call}: noise={noise} is the constraint noise of the integral rows "
                "(cl.Conservation.integral(weights=), cl.Conservation); point values and normal "
                "components are exact and there is no integral row to soften."
            )
        # point values and normal components stay exact; the dense rows get the noise
        rows_noise = torch.zeros(G.shape[1], dtype=F64, device=G.device)
        rows_noise[G.shape[1] - n_dense :] = noise
    cons = []
    if G.shape[1]:
        if bool((G == G[:1]).all()):
            G = G[0]
        cons = [Conservation(G.reshape(*lead, *G.shape[-2:]) if G.ndim == 3 else G,
                             b.reshape(*lead, b.shape[-1]))]  # fmt: skip
    var = None
    if pred.variance is not None:
        var = torch.broadcast_to(pred.variance, pred.mean.shape).reshape(*lead, n_points, n_ch)
    flat = Gaussian(u.reshape(*lead, n_points, n_ch), var, pred.covariance, pred.low_rank, None, 2)
    post = engine_project(flat, [*cons, *bounds], noise=rows_noise if noise else 0.0,
                          metric=metric, inputs=inputs, call=call)  # fmt: skip
    m = post.mean.reshape(batch, n_points, n_ch)
    m = torch.where(fixed, gval.to(m.dtype), m)  # coordinate rows to the bit
    out_var = post.variance
    if out_var is not None:
        out_var = out_var.reshape(batch, n_points, n_ch)
        if metric == "covariance":
            out_var = torch.where(fixed, 0.0, out_var)
        out_var = out_var.reshape(pred.mean.shape)
    return Gaussian(m.reshape(pred.mean.shape), out_var, pred.covariance, None, post.downdate, k,
                    post.conditioned)  # fmt: skip
