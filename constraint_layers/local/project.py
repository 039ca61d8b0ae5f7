"""The local engine's entry point: local rows, with Dirichlet walls, on deterministic and Gaussian
(diagonal variance) outputs.

Semantics (one local constraint per call, any number of ``cl.Dirichlet`` conditions and of
totals):

- Deterministic output ``u``: the Dirichlet nodes are set to their values (to the bit, as
  everywhere), then the other nodes move by the Euclidean projection onto the local rows with
  the Dirichlet values substituted:
  ``u~ = z - M C^T (C M C^T)^+ (C z - f)``, ``z`` the output with the wall values, ``M`` the free
  nodes. With Dirichlet walls this is the Euclidean projection onto all rows at once. Totals
  (conservation rows ``G u = b``, a few) too: by the Schur complement over the local solver
  (:func:`_with_totals`).
- Gaussian output with a diagonal variance ``w`` (ProbConserv's conditioning, Dirichlet nodes
  first: they get their values and zero variance): mean
  ``z - W M C^T (C W M C^T)^+ (C z - f)``; marginal variances
  ``w - diag(W M C^T K^+ C M W)`` by dense float64 algebra for grids of at most
  :data:`DENSE_VARIANCE_MAX_NODES` nodes (64 x 64); beyond that
  :meth:`LocalGaussian.estimate_variance` (Hutchinson, with its standard error). Totals: the
  Schur complement in the variance metric. Draws: Matheron's rule (exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._grid import resolve_spacing
from ..boundary.conditions import Dirichlet
from ..boundary.enforce import apply_plan, condition_rhs, plan
from ..rows import DEFAULT_GRID, GridSpec
from .constraint import LocalRows
from .solve import INVOLVED_RTOL, NULL_RTOL, fft_project, project_cg, project_step

__all__ = [
    "DENSE_VARIANCE_MAX_NODES",
    "LocalGaussian",
    "condition_local",
    "enforce_local",
    "is_local",
    "project_local",
    "project_record",
]

F64 = torch.float64
#: The largest grid (nodes per channel) whose marginal variances are formed densely.
DENSE_VARIANCE_MAX_NODES = 64 * 64


def is_local(constraints: Sequence[Any]) -> bool:
    """Whether any constraint states local rows (structure tag ``"local"``)."""
    return any(getattr(c, "structure", None) == "local" for c in constraints)


def _split(constraints: Sequence[Any], call: str) -> tuple[Any, list[Any], list[Any]]:
    """``(the local constraint, Dirichlet walls, totals (conservation rows))``."""
    local = [c for c in constraints if getattr(c, "structure", None) == "local"]
    walls = [c for c in constraints if getattr(c, "family", None) == "boundary"]
    totals = [c for c in constraints if getattr(c, "family", None) == "conservation"]
    other = [c for c in constraints if c not in local and c not in walls and c not in totals]
    if len(local) != 1:
        raise NotImplementedError(
            f"{call}: one local constraint (cl.DivergenceFree, cl.Continuity, cl.LinearPDE) per "
            f"call is supported, got {len(local)}: {local}. Combine them into one cl.LinearPDE "
            "where they share the right-hand side, or open an issue."
        )
    if other:
        raise NotImplementedError(
            f"{call}: a local constraint combines with boundary conditions and conservation "
            f"totals only (got {other}). Bounds with local rows are not supported yet."
        )
    return local[0], walls, totals


def _dirichlet_only(walls: Sequence[Any]) -> bool:
    return all(isinstance(c, Dirichlet) for c in walls)


def _step(y: Tensor, walls: Sequence[Any], grid: GridSpec, lift: int, inputs: Any, call: str):
    """The boundary step on float64 grids: ``(affine B, linear part S)``."""
    shape = tuple(y.shape)
    hs = resolve_spacing(shape[2:], spacing=grid.spacing, extent=grid.extent,
                         endpoint=grid.endpoint, call=call)  # fmt: skip
    bplan = plan(shape, walls, hs, lift, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, shape[0], F64, y.device, inputs, call)
        for c, bc in zip(bplan.conds, walls)
    ]
    zeros = [torch.zeros_like(r) for r in rhs]
    return (lambda x: apply_plan(x, bplan, rhs)), (lambda x: apply_plan(x, bplan, zeros))


def _walls(z: Tensor, walls: Sequence[Any], grid: GridSpec, inputs: Any, call: str):
    """``(z with the wall values, free-node mask (channels, *grid) or None)``."""
    if not walls:
        return z, None
    shape = tuple(z.shape)
    hs = resolve_spacing(shape[2:], spacing=grid.spacing, extent=grid.extent,
                         endpoint=grid.endpoint, call=call)  # fmt: skip
    bplan = plan(shape, walls, hs, 0, grid.endpoint, call)
    rhs = [
        condition_rhs(c, bc, shape[0], z.dtype, z.device, inputs, call)
        for c, bc in zip(bplan.conds, walls)
    ]
    z = apply_plan(z, bplan, rhs)
    mask = torch.ones(math.prod(shape[1:]), dtype=torch.bool)
    for c in bplan.conds:
        mask[c.moves.flatten()] = False
    return z, mask.reshape(shape[1:]).to(z.device)


def _check_grid_output(mean: Tensor, call: str) -> None:
    if mean.ndim < 3:
        raise ValueError(
            f"{call}: local constraints act on channel-first grid outputs (batch, channels, d1, "
            f"..., dn); got shape {tuple(mean.shape)}."
        )
    if mean.is_complex():
        raise TypeError(
            f"{call}: local constraints act on real outputs, got {mean.dtype}; constrain the "
            "real and imaginary parts as channels (torch.view_as_real)."
        )


def enforce_local(
    y: Tensor,
    constraint: Any,
    *walls: Any,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    lift: int = 0,
) -> Tensor:
    """Project a grid output onto a local constraint (and walls, and totals), Euclidean.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn). Not modified.
    constraint : LinearPDE
        ``cl.DivergenceFree``, ``cl.Continuity`` or ``cl.LinearPDE``.
    *walls : boundary conditions or Conservation
        Boundary conditions held at the same time: ``cl.Dirichlet`` nodes are eliminated (e.g.
        no-slip walls: the Euclidean projection onto all rows); other conditions (Neumann,
        periodic, ``lift``) keep the meaning of their boundary step ``B(v) = S v + g`` and the
        local rows act on the freedom it leaves: ``B(u - S^T C^T (C S S^T C^T)^+ (C B(u) -
        f))``. Totals (``cl.Conservation``, ``cl.Conservation.integral``; with Dirichlet walls
        or none) by the Schur complement over the local solver (one local solve per total).
    spacing, extent, endpoint, inputs, lift
        The grid (as for :func:`~constraint_layers.functional.enforce_boundary`), the model
        input for callable values, and the boundary step's lift.

    Returns
    -------
    Tensor
        The closest output (Euclidean) with every row exact: same shape and dtype.
    """
    call = "enforce_local"
    return project_local(
        y, [constraint, *walls], grid=GridSpec(spacing, extent, endpoint), inputs=inputs,
        lift=lift, call=call,
    )  # fmt: skip


def project_local(
    y: Tensor,
    constraints: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    inputs: Any = None,
    lift: int = 0,
    call: str = "project_local",
) -> Tensor:
    """The deterministic projection (see the module docstring): ``y`` (batch, channels, *grid)."""
    _check_grid_output(y, call)
    local, walls, totals = _split(constraints, call)
    if y.shape[0] == 0:
        return y
    if (walls and not _dirichlet_only(walls)) or lift:
        if totals:
            raise NotImplementedError(
                f"{call}: totals with local rows and non-Dirichlet walls (or lift) are not "
                "supported yet."
            )
        rows = local.rows(tuple(y.shape), grid=grid, inputs=inputs)
        affine, linear = _step(y.to(F64), walls, grid, lift, inputs, call)
        out = project_step(rows.operator, y.to(F64), linear, affine, rows.rhs.to(y.device), call)
        return out.to(y.dtype)
    z, mask = _walls(y, walls, grid, inputs, call)
    rows: LocalRows = local.rows(tuple(y.shape), grid=grid, inputs=inputs)
    op = rows.operator
    z64 = z.to(F64)
    f = rows.rhs.to(z.device)

    def local_projection(x: Tensor, rhs: Tensor, check: bool = True) -> Tensor:
        if mask is None and op.fourier:  # f = 0: no transform of it, nothing to check
            return fft_project(op, x, None if not check else rhs, call)
        return project_cg(op, x, rhs, mask=mask, call=call, check=check)

    # f = 0 with nothing eliminated: the right-hand side C z is in the range by construction
    homogeneous = mask is None and isinstance(local.value, float) and local.value == 0.0
    out = local_projection(z64, f, check=not homogeneous)
    if totals:
        out = _with_totals(out, local_projection, mask, totals, grid, inputs, y.dtype, call)
    out = out.to(y.dtype)
    if mask is not None:  # wall values to the bit
        out = torch.where(mask, out, z)
    return out


def _with_totals(u1, local_projection, mask, totals, grid, inputs, dtype, call) -> Tensor:
    """Totals ``G u = b`` (a few dense rows) on top of the local rows, by the Schur complement
    over the local solver: ``u = u1 - V mu`` with ``V = P0(M G^T)`` (each row, as a field on the
    free nodes, projected onto the null space of the local rows: one local solve per row) and
    ``(G V) mu = G u1 - b``. The Euclidean projection onto all rows at once (float64)."""
    from .._tolerance import tolerance
    from ..rows import Rows

    shape = tuple(u1.shape)
    n = math.prod(shape[1:])
    parts = [c.rows(shape, grid=grid, inputs=inputs) for c in totals]
    stacked = Rows.stack(parts, shape[0])
    G = stacked.dense(n).to(u1.device)  # (M, n) or (batch, M, n)
    b = stacked.rhs.to(u1.device)  # (batch, M)
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
    labels = [f"{c!r} row {i}" for c, p in zip(totals, parts) for i in range(p.num_rows)]
    mu = _solve_small(A, r, scale, tolerance(dtype).residual, labels, call)
    step = mu @ V if V.ndim == 2 else (mu.unsqueeze(-2) @ V).squeeze(-2)
    return (flat - step).reshape(shape)


def _solve_small(A: Tensor, r: Tensor, scale: Tensor, tol: float, labels, call: str) -> Tensor:
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


class LocalGaussian:
    """A Gaussian with diagonal variance conditioned on local rows (and Dirichlet walls, and
    totals).

    Attributes
    ----------
    mean : Tensor
        (batch, channels, *grid): every row holds to rounding.
    """

    def __init__(self, mean, var, op, mask, f, z, totals, dtype, call) -> None:
        self.mean = mean
        self._var = var  # the prior variance, 0 at the Dirichlet nodes
        self._op, self._mask, self._f, self._z = op, mask, f, z
        self._totals = totals  # None or (G, b, V, A^+): the Schur complement of the totals
        self._dtype, self._call = dtype, call
        self._variance: Tensor | None = None

    def _project(self, x: Tensor, f: Tensor, w: Tensor) -> Tensor:
        """The projection onto the local rows in the variance metric (``x`` (k, *event))."""
        return project_cg(self._op, x, f, mask=self._mask, weight=w, call=self._call)

    def _totals_part(self) -> Tensor:
        """``diag(V^T A^+ V)``: what the totals take off the variances (0 without totals)."""
        if self._totals is None:
            return torch.zeros((), dtype=F64)
        _, _, V, Ap = self._totals  # V (batch, M, n), A^+ (batch, M, M)
        return ((Ap @ V) * V).sum(-2).reshape(self._var.shape)

    @property
    def variance(self) -> Tensor:
        """The exact marginal variances (dense float64 algebra; grids of at most
        :data:`DENSE_VARIANCE_MAX_NODES` nodes per channel; beyond that see
        :meth:`estimate_variance`)."""
        if self._variance is None:
            n = math.prod(self._op.grid)
            if n > DENSE_VARIANCE_MAX_NODES:
                raise NotImplementedError(
                    f"{self._call}: exact marginal variances are formed densely up to "
                    f"{DENSE_VARIANCE_MAX_NODES} nodes per channel (64 x 64); this grid has {n}. "
                    "Estimate them with their standard error: g.estimate_variance(probes)."
                )
            var = _dense_variance(self._op, self._var, self._mask) - self._totals_part()
            self._variance = var.clamp_min(0.0).to(self._dtype)
        return self._variance

    def estimate_variance(
        self, probes: int = 64, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Hutchinson's estimate of the marginal variances and its standard error (any size).

        ``var = w - diag(B) - diag(V^T A^+ V)`` with ``B = W M C^T K^+ C M W``: ``diag(B)`` is
        estimated by ``mean_p z_p * (B z_p)`` over Rademacher probes ``z_p`` (one CG solve each;
        unbiased), the totals' part exactly. Returns ``(estimate, standard error)``, each
        (batch, channels, *grid): the standard error is the probes' sample standard deviation
        over ``sqrt(probes)``.
        """
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
            raise ValueError(f"estimate_variance: probes must be an int >= 2, got {probes!r}.")
        w = self._var.to(F64)
        signs = torch.randint(0, 2, (probes, *w.shape), generator=generator, dtype=F64)
        z = (2 * signs - 1).to(w.device)
        y = (w * z).flatten(0, 1)
        if self._mask is not None:
            y = y * self._mask
        ww = w.repeat(probes, *[1] * (w.ndim - 1))
        f = torch.zeros((y.shape[0], *self._op.grid), dtype=F64, device=y.device)
        bz = (y - self._project(y, f, ww)).reshape(probes, *w.shape)
        terms = z * bz
        est = w - terms.mean(0) - self._totals_part()
        se = terms.std(0) / math.sqrt(probes)
        return est.to(self._dtype), se.to(self._dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws (Matheron's rule: draw from the prior, then move in the variance
        metric onto the rows): (n, batch, channels, *grid); every draw satisfies every row."""
        w = self._var.to(F64)
        eps = torch.randn((n, *w.shape), dtype=F64, generator=generator).to(w.device)
        x = (self._z.to(F64) + w.sqrt() * eps).flatten(0, 1)
        if self._mask is not None:
            x = torch.where(self._mask, x, self._z.to(F64).repeat(n, *[1] * (x.ndim - 1)))
        ww = w.repeat(n, *[1] * (w.ndim - 1))
        f = self._f.repeat(n, *[1] * (self._f.ndim - 1))
        out = self._project(x, f, ww).reshape(n, *w.shape)
        if self._totals is not None:
            out = _totals_step(out.reshape(n, w.shape[0], -1), *self._totals).reshape(out.shape)
        return out.to(self._dtype)


def _totals_step(x: Tensor, G: Tensor, b: Tensor, V: Tensor, Ap: Tensor) -> Tensor:
    """``x - V^T A^+ (G x - b)`` for ``x`` (*, batch, n) (the totals' Schur step)."""
    r = (x.unsqueeze(-2) @ G.mT).squeeze(-2) - b  # (*, batch, M)
    mu = (Ap @ r.unsqueeze(-1)).squeeze(-1)
    return x - (mu.unsqueeze(-2) @ V).squeeze(-2)


def condition_local(
    mean: Tensor,
    variance: Tensor,
    constraint: Any,
    *walls: Any,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    call: str = "condition_local",
) -> LocalGaussian:
    """Condition a Gaussian with diagonal variance on a local constraint (with Dirichlet walls
    and totals).

    Parameters
    ----------
    mean, variance : Tensor
        shape: (batch, channels, d1, ..., dn); variances >= 0 (positive on the nodes the rows
        read). Not modified.
    constraint, walls, spacing, extent, endpoint, inputs
        As for :func:`enforce_local`. Totals are conditioned on jointly, by the Schur
        complement over the local solver in the variance metric.

    Returns
    -------
    LocalGaussian
        ``.mean`` (differentiable: implicit backward), ``.variance`` (exact, dense, up to 64 x
        64 nodes), ``.estimate_variance(probes)`` (Hutchinson, with its standard error),
        ``.sample(n)`` (exact draws).
    """
    _check_grid_output(mean, call)
    local, walls_, totals = _split([constraint, *walls], call)
    if not _dirichlet_only(walls_):
        raise NotImplementedError(
            f"{call}: Gaussian outputs are conditioned on local rows with cl.Dirichlet walls "
            "only; Neumann / periodic walls are not supported yet there."
        )
    grid = GridSpec(spacing, extent, endpoint)
    variance = torch.broadcast_to(variance, mean.shape)
    if not bool((variance.detach() >= 0).all()):
        raise ValueError(f"{call}: the variance holds negative values; expected variances >= 0.")
    z, mask = _walls(mean, walls_, grid, inputs, call)
    if mask is not None:
        variance = torch.where(mask, variance, torch.zeros_like(variance))
    rows: LocalRows = local.rows(tuple(mean.shape), grid=grid, inputs=inputs)
    op = rows.operator
    f = rows.rhs.to(mean.device)
    w = variance.to(F64)
    out = project_cg(op, z.to(F64), f, mask=mask, weight=w, call=call)
    schur = None
    if totals:
        schur = _totals_schur(out, op, mask, w, totals, grid, inputs, mean.dtype, call)
        out = _totals_step(out.reshape(out.shape[0], -1), *schur).reshape(out.shape)
    out = out.to(mean.dtype)
    if mask is not None:
        out = torch.where(mask, out, z)
    return LocalGaussian(out, variance, op, mask, f, z, schur, mean.dtype, call)


def _totals_schur(m1, op, mask, w, totals, grid, inputs, dtype, call):
    """``(G, b, V, A^+)`` of the totals in the variance metric: ``V = Sigma_1 G^T`` (each row,
    weighted by the variance, projected onto the local rows in that metric: one local solve per
    row and sample), ``A = G V^T``; the totals must be compatible with ``m1``'s rows."""
    from .._tolerance import tolerance
    from ..rows import Rows

    shape = tuple(m1.shape)
    batch, n = shape[0], math.prod(shape[1:])
    parts = [c.rows(shape, grid=grid, inputs=inputs) for c in totals]
    stacked = Rows.stack(parts, batch)
    G = stacked.dense(n).to(m1.device)
    G = G.expand(batch, *G.shape[-2:]) if G.ndim == 2 else G  # (batch, M, n)
    b = stacked.rhs.to(m1.device)
    k = G.shape[-2]
    y = (G.reshape(batch, k, *shape[1:]) * w.unsqueeze(1)).flatten(0, 1)
    if mask is not None:
        y = y * mask
    ww = w.repeat_interleave(k, 0)
    zero = torch.zeros((batch * k, *shape[2:]), dtype=F64, device=m1.device)
    V = project_cg(op, y, zero, mask=mask, weight=ww, call=call, check=False)
    V = V.reshape(batch, k, n)
    A = G @ V.mT
    A = 0.5 * (A + A.mT)
    flat = m1.reshape(batch, n)
    r = (G @ flat.unsqueeze(-1)).squeeze(-1) - b
    scale = (G.abs() @ flat.abs().unsqueeze(-1)).squeeze(-1) + b.abs()
    labels = [f"{c!r} row {i}" for c, p in zip(totals, parts) for i in range(p.num_rows)]
    _solve_small(A, r, scale, tolerance(dtype).residual, labels, call)  # compatibility
    lam, Q = torch.linalg.eigh(A)
    keep = lam > NULL_RTOL * lam.amax(-1, keepdim=True).clamp_min(torch.finfo(F64).tiny)
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
    Ap = (Q * inv.unsqueeze(-2)) @ Q.mT
    return G, b, V, Ap


def _dense_variance(op: Any, var: Tensor, mask: Tensor | None) -> Tensor:
    """``w - diag(W C^T K^+ C W)`` per sample, dense float64 (``W`` masked)."""
    n = math.prod(op.shape)
    eye = torch.eye(n, dtype=F64, device=var.device).reshape(n, *op.shape)
    C = op.apply(eye).reshape(n, -1).T  # (M, n)
    out = []
    for w in var.to(F64):
        wf = w.reshape(-1)
        if mask is not None:
            wf = wf * mask.reshape(-1).to(wf.dtype)
        K = (C * wf) @ C.T
        lam, V = torch.linalg.eigh(K)
        keep = lam > NULL_RTOL * lam.amax().clamp_min(torch.finfo(F64).tiny)
        B = (V[:, keep] * lam[keep].rsqrt()).T @ (C * wf)  # (r, n)
        out.append((wf - B.square().sum(0)).clamp_min(0.0).reshape(op.shape))
    return torch.stack(out)


def project_record(
    pred: Any,
    constraints: Sequence[Any],
    *,
    grid: GridSpec = DEFAULT_GRID,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    debug: bool = False,
    lift: int = 0,
    call: str = "project",
) -> Any:
    """The layer's entry: a prediction record (:class:`~constraint_layers.functional.Gaussian`)
    with local rows. Deterministic: :func:`project_local`; a diagonal variance:
    :func:`condition_local` (``metric="covariance"``) or the Euclidean move of the mean with the
    variance kept (``metric="euclidean"``)."""
    from ..conservation.gaussian import Gaussian

    if grid_shape is not None or pred.event_ndim != pred.mean.ndim - 1:
        raise NotImplementedError(
            f"{call}: local constraints act on channel-first grid outputs (batch, channels, d1, "
            "..., dn); flat outputs (grid_shape=) are not supported."
        )
    if not (isinstance(noise, (int, float)) and noise == 0):
        raise NotImplementedError(f"{call}: local rows are exact; noise must be 0, got {noise}.")
    if pred.covariance is not None or pred.low_rank is not None:
        raise NotImplementedError(
            f"{call}: local rows condition Gaussians with a diagonal variance; a dense or "
            "low-rank covariance is not supported yet."
        )
    mean = pred.mean
    if pred.variance is None or metric == "euclidean":
        out = project_local(mean, constraints, grid=grid, inputs=inputs, lift=lift, call=call)
        var = pred.variance
    else:
        local, walls, totals = _split(constraints, call)
        if lift or not _dirichlet_only(walls):
            raise NotImplementedError(
                f"{call}: Gaussian outputs are conditioned on local rows with cl.Dirichlet walls "
                "(lift=0) only; Neumann / periodic walls or a lift are not supported yet there "
                "(metric='euclidean' moves the mean with them)."
            )
        g = condition_local(
            mean, pred.variance, local, *walls, *totals, spacing=grid.spacing, extent=grid.extent,
            endpoint=grid.endpoint, inputs=inputs, call=call,
        )  # fmt: skip
        out, var = g.mean, g.variance
    if debug:
        _debug_check(out, constraints, grid, inputs, call)
    return Gaussian(out, var, event_ndim=pred.event_ndim)


def _debug_check(y: Tensor, constraints: Sequence[Any], grid: GridSpec, inputs: Any, call: str):
    from .._tolerance import tolerance
    from ..errors import ConstraintViolationError

    local, _, totals = _split(constraints, call)
    tol = tolerance(y.dtype).residual
    for c in (local, *totals):
        rel = float(c.rows(tuple(y.shape), grid=grid, inputs=inputs).relative_residual(
            y.detach().flatten(1) if c is not local else y.detach()).max())  # fmt: skip
        if not rel <= tol:  # NaN fails too
            raise ConstraintViolationError(
                f"{call}(debug=True): {c!r} has relative residual {rel:.3e} after the "
                f"projection (tolerance {tol:.1e} for {y.dtype}). This is a bug: please report it."
            )
