"""Gaussians conditioned on local rows: the entry :func:`condition_local`, and the diagonal path.

A diagonal variance with Dirichlet walls (or none) takes the path below; a full covariance, a
low-rank one, or walls of other kinds go to :mod:`constraint_layers.local.covariance`; bounds
(diagonal variance, Dirichlet walls) to :func:`_condition_bounded` (the bounded projection in the
variance metric, the engine's ``variance="rows"`` / ``"active"`` uncertainty).

ProbConserv's conditioning at every node: mean ``z - W M C^T (C W M C^T)^+ (C z - f)`` by CG
(:func:`~constraint_layers.local.implicit.project_cg` in the variance metric), the Dirichlet
nodes first (their values, zero variance). Marginal variances ``w - diag(W M C^T K^+ C M W)`` by
dense float64 algebra up to ``DENSE_VARIANCE_MAX_NODES`` nodes per channel (64 x 64);
beyond that :meth:`LocalGaussian.estimate_variance` (Hutchinson, with its standard error).
Totals: the Schur complement in the variance metric. Draws: Matheron's rule (exact).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..rows import GridSpec
from .bounded import check_walls_in_bounds
from .constraint import LocalRows
from .covariance import DENSE_VARIANCE_MAX_NODES, LocalConditioned, condition_covariance
from .implicit import project_cg
from .project import _check_grid_output, _dirichlet_only, _split, _walls
from .solve import NULL_RTOL
from .totals import dense_totals, solve_small

__all__ = ["DENSE_VARIANCE_MAX_NODES", "LocalGaussian", "condition_local"]

F64 = torch.float64


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
        #: bounds with variance="rows": the bounded mean minus the equality-only one (draws of
        #: the equality-only posterior, shifted onto the bounded mean)
        self._shift: Tensor | None = None

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
        ``DENSE_VARIANCE_MAX_NODES`` nodes per channel; beyond that see
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
        if self._shift is not None:
            out = out + self._shift
        return out.to(self._dtype)


def _totals_step(x: Tensor, G: Tensor, b: Tensor, V: Tensor, Ap: Tensor) -> Tensor:
    """``x - V^T A^+ (G x - b)`` for ``x`` (*, batch, n) (the totals' Schur step)."""
    r = (x.unsqueeze(-2) @ G.mT).squeeze(-2) - b  # (*, batch, M)
    mu = (Ap @ r.unsqueeze(-1)).squeeze(-1)
    return x - (mu.unsqueeze(-2) @ V).squeeze(-2)


def condition_local(
    mean: Tensor,
    variance: Tensor | None,
    constraint: Any,
    *walls: Any,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    call: str = "condition_local",
) -> LocalGaussian | LocalConditioned:
    """Condition a Gaussian on a local constraint (with walls and totals).

    Parameters
    ----------
    mean : Tensor
        shape: (batch, channels, d1, ..., dn). Not modified.
    variance : Tensor or None
        shape: the mean's (broadcastable); variances >= 0 (positive on the nodes the rows read).
        With ``low_rank``: the diagonal part of ``Sigma = diag(variance) + L L^T`` (optional).
        None with ``covariance``.
    constraint, walls, spacing, extent, endpoint, inputs
        As for :func:`enforce_local`. Walls of any kind (``cl.Dirichlet``, ``cl.Neumann``,
        periodic) and totals are conditioned on jointly with the local rows (Dirichlet nodes
        take their values, with zero variance).
    covariance : Tensor or linear operator, optional
        The full covariance over the flattened event ``N = channels * prod(grid)`` (C order),
        shape (N, N) or (batch, N, N): a dense tensor, or any object with ``matmul`` (or ``@``)
        and ``diagonal()`` (e.g. a GP's ``lazy_covariance_matrix``), conditioned matrix-free.
    low_rank : Tensor, optional
        ``L``, shape (N, K) or (batch, N, K): ``Sigma = diag(variance) + L L^T``.

    Returns
    -------
    LocalGaussian or LocalConditioned
        ``.mean`` (differentiable: implicit backward), ``.variance`` (exact, dense, up to 64 x
        64 nodes per channel), ``.estimate_variance(probes)`` (Hutchinson, with its standard
        error), ``.sample(n)`` (exact draws). A diagonal variance with Dirichlet walls (or none)
        gives a :class:`~constraint_layers.local.LocalGaussian`; a full covariance, a low-rank
        one or other walls a :class:`~constraint_layers.local.covariance.LocalConditioned` (the
        same methods, and ``.covariance()``, ``.log_prob``).
    """
    _check_grid_output(mean, call)
    local, walls_, totals = _split([constraint, *walls], call)
    bounds = [c for c in totals if c.family == "bounds"]
    totals = [c for c in totals if c.family != "bounds"]
    grid = GridSpec(spacing, extent, endpoint)
    if bounds:
        if covariance is not None or low_rank is not None or totals or not _dirichlet_only(walls_):
            raise NotImplementedError(
                f"{call}: Gaussian outputs with bounds and local rows are supported with a "
                "diagonal variance and cl.Dirichlet walls (or none), without totals; not yet "
                "with a full or low-rank covariance, other walls or totals (deterministic "
                "outputs take bounds with Dirichlet walls)."
            )
        if variance is None:
            raise ValueError(f"{call}: no uncertainty given: pass variance=.")
        return _condition_bounded(mean, variance, local, walls_, bounds, grid, inputs, call)
    if covariance is not None or low_rank is not None or not _dirichlet_only(walls_):
        return condition_covariance(
            mean, local, walls_, totals, covariance=covariance, low_rank=low_rank,
            variance=variance, grid=grid, inputs=inputs, call=call,
        )  # fmt: skip
    if variance is None:
        raise ValueError(f"{call}: no uncertainty given: pass variance=, covariance= or low_rank=.")
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
        # the totals' step moves along V, whose local rows hold to the solver's rounding of V's
        # own scale only: a second pass (idempotent in exact arithmetic; the same Schur factors)
        # puts both back to rounding of the output's scale
        out = project_cg(op, out, f, mask=mask, weight=w, call=call)
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

    shape = tuple(m1.shape)
    batch, n = shape[0], math.prod(shape[1:])
    G, b, labels = dense_totals(totals, shape, grid, inputs, m1.device)
    G = G.expand(batch, *G.shape[-2:]) if G.ndim == 2 else G  # (batch, M, n)
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
    solve_small(A, r, scale, tolerance(dtype).residual, labels, call)  # compatibility
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


def _condition_bounded(mean, variance, local, walls, bounds, grid, inputs, call) -> LocalGaussian:
    """Bounds with local rows on a diagonal-variance Gaussian, the semantics of the engine's
    Gaussian + bounds (:mod:`constraint_layers._project_bounds`): the mean is the bounded
    projection in the variance metric (the mode of the conditioned Gaussian restricted to the
    box: :func:`~constraint_layers.local.bounded.project_local_bounded` with the metric); the
    uncertainty, by the bounds' ``variance``: ``"rows"`` (every bound's default) the
    equality-only posterior around the bounded mean (draws shifted onto it), ``"active"`` the
    Gaussian conditioned on the rows and on the active bounds held as equalities (variance 0
    there; its draws satisfy every row and sit on the active bounds)."""
    from ..bounds import resolve_bounds
    from .bounded import project_local_bounded

    variance = torch.broadcast_to(variance, mean.shape)
    if not bool((variance.detach() >= 0).all()):
        raise ValueError(f"{call}: the variance holds negative values; expected variances >= 0.")
    z, mask = _walls(mean, walls, grid, inputs, call)
    lo, hi = resolve_bounds(bounds, tuple(mean.shape), dtype=F64, device=mean.device,
                            inputs=inputs, flat_shape=None, call=call)  # fmt: skip
    check_walls_in_bounds(z, mask, lo, hi, bounds, call)
    rows: LocalRows = local.rows(tuple(mean.shape), grid=grid, inputs=inputs)
    op, f = rows.operator, rows.rhs.to(mean.device)
    w = variance.to(F64)
    if mask is not None:
        w = torch.where(mask, w, torch.zeros_like(w))
    x = project_local_bounded(op, z.to(F64), f, mask, lo, hi, call, weight=w)
    out = x.to(mean.dtype)
    if mask is not None:
        out = torch.where(mask, out, z)
    if lo is not None:  # the cast to the output dtype may round across a bound
        out = torch.maximum(out, lo.to(mean.dtype))
    if hi is not None:
        out = torch.minimum(out, hi.to(mean.dtype))
    if all(getattr(b, "variance", "rows") == "rows" for b in bounds):
        g = condition_local(mean, variance, local, *walls, spacing=grid.spacing, extent=grid.extent,
                            endpoint=grid.endpoint, inputs=inputs, call=call)  # fmt: skip
        g._shift = (x - g.mean.to(F64)).detach()
        g.mean = out
        return g
    held = torch.zeros(mean.shape, dtype=torch.bool, device=mean.device)
    if lo is not None:
        held |= x.detach() <= lo.detach()
    if hi is not None:
        held |= x.detach() >= hi.detach()
    # the held nodes get zero variance: conditioned on as equalities (per sample), they do not
    # move in the variance metric
    zh = torch.where(held, x.to(mean.dtype), z)
    vh = torch.where(held, torch.zeros_like(w), w)
    return LocalGaussian(out, vh, op, mask, f, zh, None, mean.dtype, call)
