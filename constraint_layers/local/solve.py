"""Solvers for local rows: the FFT projection and preconditioned CG with an implicit backward
(private).

The projection of a grid output ``z`` onto ``C u = f`` in the metric ``W`` (``W = I``: Euclidean;
``W = diag(w)``: a diagonal variance), moving only the free nodes ``M`` (Dirichlet nodes
eliminated):

    u~ = z - W M C^T lam,    (C W M C^T) lam = C z - f.

- Every differentiated axis periodic, Euclidean, nothing eliminated: :func:`fft_project`, one
  projection per wavenumber (exact; wavenumbers whose row vanishes are left as they are, their
  right-hand side must vanish).
- Otherwise: :func:`project_cg`, conjugate gradients on ``K = C W M C^T`` in float64,
  preconditioned by the separable fast solve of ``C C^T``
  (:mod:`~constraint_layers.local.fastsolve`; scaled on each side by ``w`` averaged over a
  window; exact next to Dirichlet walls by the capacitance solve,
  :mod:`~constraint_layers.local.capacitance`), stopped on the relative residual of the ROWS
  (CG's residual ``C z - f - K lam`` is the rows' residual of the current iterate ``C u~ - f``). The
  backward is implicit: one more solve with ``K``, never autograd through the iterations.

Thresholds (all relative; every threshold of the local package lives in
``constraint_layers._tolerance``, re-exported here): :data:`CG_RTOL` (the target of the rows'
residual, float64 work), :data:`ACCEPT_RTOL` (the largest accepted; beyond
:data:`INCONSISTENT_RTOL` the data are incompatible), :data:`NULL_RTOL` (an eigenvalue or symbol
treated as zero), :data:`INVOLVED_RTOL`, :data:`PATIENCE` and :data:`GROWTH` (CG's stop on
incompatible data).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache

import torch
from torch import Tensor

# the thresholds live in the one tolerance module (section "local rows"); re-exported here
from .._tolerance import (
    ACCEPT_RTOL,
    BOX_WINDOW,
    CG_RTOL,
    GROWTH,
    INCONSISTENT_RTOL,
    INVOLVED_RTOL,
    MAXITER,
    NULL_RTOL,
    PATIENCE,
)
from ..errors import (
    ConstraintViolationError,
    IncompatibleConstraintsError,
    SingularConstraintError,
)
from .fastsolve import (
    FastSolve,
    _free_lines,
    _mask_from_key,
    _mask_key,
    fast_solve,
    op_key,
)
from .operator import LocalOperator

__all__ = [
    "ACCEPT_RTOL",
    "CG_RTOL",
    "INCONSISTENT_RTOL",
    "INVOLVED_RTOL",
    "NULL_RTOL",
    "FastSolve",
    "System",
    "fft_project",
    "pcg",
]

F64 = torch.float64


def _scale(op: LocalOperator, z: Tensor, f: Tensor) -> Tensor:
    """``row_scale max|u| + max|f|`` per sample: (batch,)."""
    zs = z.detach().abs().flatten(1).amax(1)
    fs = f.detach().abs().flatten(1).amax(1) if f.numel() else torch.zeros_like(zs)
    return op.row_scale() * zs + fs + torch.finfo(F64).tiny


def _net_flux_message(what: float, call: str, op: LocalOperator) -> str:
    return (
        f"{call}: the local constraint cannot hold with these data: the net flux (the part of "
        f"the right-hand side and wall values that no field on the free nodes can produce, the "
        f"discrete Gauss law of the stencil) is {what:.6e}, not 0. A field whose discrete "
        "derivative combination equals the right-hand side with these wall values does not "
        "exist: make the wall values carry zero net flux (e.g. inflow = outflow) and the "
        "right-hand side integrate to it."
    )


# ------------------------------------------------------------------------- the FFT path
def fft_project(
    op: LocalOperator, z: Tensor, f: Tensor | None, call: str, check: bool = True
) -> Tensor:
    """The Euclidean projection per wavenumber (differentiable through the FFTs).

    ``z`` (batch, channels, *grid) float64, ``f`` (batch, *grid) float64 or None (zero: then
    nothing to check).
    """
    d = len(op.grid)
    dims = tuple(range(2, 2 + d))
    chans = list(op.channels)
    s = _symbols(op_key(op), z.device)  # (k, *rgrid)
    norm2 = s.abs().square().sum(0)
    zero = norm2 <= NULL_RTOL**2 * norm2.amax()
    zh = torch.fft.rfftn(z[:, chans], dim=dims)
    r = (s * zh).sum(1)  # (batch, *rgrid)
    if f is None:
        return _fft_finish(op, z, zh, s, r, norm2, zero, chans, dims)
    fh = torch.fft.rfftn(f, dim=tuple(range(1, 1 + d)))
    r = r - fh
    off = fh.abs().where(zero, 0.0).detach()
    if check and bool((off > INCONSISTENT_RTOL * _scale(op, z, f).reshape(-1, *[1] * d)
                       * math.prod(op.grid)).any()):  # fmt: skip
        raise IncompatibleConstraintsError(
            _net_flux_message(float(off.amax()) / math.prod(op.grid), call, op)
            + " (periodic grid: the right-hand side's Fourier coefficient where the rows vanish, "
            "e.g. its mean)"
        )
    return _fft_finish(op, z, zh, s, r, norm2, zero, chans, dims)


def _fft_finish(op, z, zh, s, r, norm2, zero, chans, dims) -> Tensor:
    """``z`` with the channels read moved by ``-conj(s) r / |s|^2`` per wavenumber."""
    coef = torch.where(zero, 0.0, r / torch.where(zero, 1.0, norm2))
    zh = zh - s.conj() * coef.unsqueeze(1)
    out = torch.fft.irfftn(zh, s=op.grid, dim=dims)
    parts = list(z.unbind(1))
    for i, c in enumerate(chans):
        parts[c] = out[:, i]
    return torch.stack(parts, 1)


def _box_mean(x: Tensor, periodic: tuple[bool, ...]) -> Tensor:
    """The mean of ``x`` (batch, *grid) over a window of :data:`BOX_WINDOW` nodes per axis
    (wrapping on periodic axes, the edge value repeated at walls)."""
    k = BOX_WINDOW // 2
    for axis, per in enumerate(periodic):
        y = x.movedim(axis + 1, -1)
        n = y.shape[-1]
        flat = y.reshape(-1, 1, n)
        pad = torch.nn.functional.pad(flat, (k, k), mode="circular" if per else "replicate")
        y = pad.unfold(-1, 2 * k + 1, 1).mean(-1).reshape(y.shape)
        x = y.movedim(-1, axis + 1)
    return x


@lru_cache(maxsize=32)
def _symbols(key: tuple, device: torch.device) -> Tensor:
    return LocalOperator(*key).symbols().to(device)


# ----------------------------------------------------------------- the discrete Gauss law
def gauss_flux(op: LocalOperator, mask: Tensor | None, r: Tensor) -> tuple[float, Tensor] | None:
    """The discrete net flux ``lam^T r`` with ``lam = w_1 x ... x w_d`` (per differentiated
    axis, ``w`` solves ``D^T w = e_last - e_first``: the quadrature under which ``D``
    integrates exactly, ``w^T D u = u_last - u_first``), when ``lam`` is in the null space of
    ``M C^T`` (each channel held at the walls of its own axis): then no free value can change
    it and ``C u = f`` needs it to vanish. Returns ``(sum |lam|, net (batch,))`` or None.
    """
    if any(t.order != 1 for t in op.terms) or not op.separable:
        return None
    key = op_key(op)
    if not _gauss_applies(key, None if mask is None else _mask_key(mask)):
        return None
    lam = _gauss_weights(key)[0]
    return float(lam.abs().sum()), (r * lam.to(r.device)).flatten(1).sum(1)


@lru_cache(maxsize=64)
def _gauss_applies(key: tuple, mask_key: tuple | None) -> bool:
    """Whether ``lam`` is in the null space of ``M C^T`` (cached per operator and mask)."""
    ct = _gauss_weights(key)[1]
    moving = ct if mask_key is None else ct * _mask_from_key(mask_key)
    return float(moving.abs().max()) <= NULL_RTOL * float(ct.abs().max())


@lru_cache(maxsize=32)
def _gauss_weights(key: tuple) -> tuple[Tensor, Tensor]:
    """``lam = w_1 x ... x w_d`` (see :func:`gauss_flux`) and ``C^T lam``."""
    op = LocalOperator(*key)
    ws = []
    for axis, n in enumerate(op.grid):
        if axis not in op.axes:
            ws.append(torch.ones(n, dtype=F64))
            continue
        t = next(t for t in op.terms if t.axis == axis)
        D = op.ops[op.terms.index(t)].dense() * t.coefficient
        e = torch.zeros(n, dtype=F64)
        e[0], e[-1] = -1.0, 1.0
        ws.append(torch.linalg.lstsq(D.T, e.unsqueeze(1), driver="gelsd").solution.squeeze(1))
    lam = ws[0]
    for w in ws[1:]:
        lam = torch.outer(lam.reshape(-1), w).reshape(*lam.shape, -1)
    return lam, op.transpose(lam.unsqueeze(0))[0]


# --------------------------------------------------------------------------------- CG
class System:
    """``K = C W M C^T`` for one call: operator, free-node mask and weight.

    ``exact``: with Dirichlet nodes eliminated (a mask, no weight), precondition by the exact
    capacitance solve (:mod:`constraint_layers.local.capacitance`, set up once per operator and
    mask) where the system differs from the fast solve on few nodes; CG then stops after one
    iteration. False: the fast solve alone (masks that change at every call, e.g. an active set).
    """

    def __init__(
        self,
        op: LocalOperator,
        mask: Tensor | None,
        weight: Tensor | None,
        exact: bool = False,
    ) -> None:
        self.op = op
        self.mask = mask  # (channels, *grid) bool, True: free
        self.weight = weight  # (batch, channels, *grid) float64, or None
        free = _free_lines(op, mask)
        self.pre = fast_solve(op_key(op), free)
        self._cap_key = None  # the capacitance solve's cache key, built at the first solve
        if exact and weight is None and (mask is not None or self.pre.approximate):
            self._cap_key = (op_key(op), free, None if mask is None else _mask_key(mask))
        self.check = True
        self.patience = PATIENCE  # CG iterations without halving the residual before it stops
        self.row_scale = None
        if weight is not None:
            # K = C W C^T ~ D (C C^T) D with D^2 the variance averaged over a window of
            # BOX_WINDOW nodes per axis (over the free nodes of the channels read): the
            # preconditioner D^-1 (C C^T)^+ D^-1 (measured: CG iterations flat in N for smooth
            # variance fields, slowly growing for i.i.d. ones)
            chans = list(op.channels)
            w = weight[:, chans]
            m = torch.ones_like(w) if mask is None else mask[chans].to(w.device, F64).expand_as(w)
            num = _box_mean((w * m).sum(1), op.periodic)
            den = _box_mean(m.sum(1).expand_as(num), op.periodic)
            mean = (w * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
            local = torch.where(den > 0, num / den.clamp_min(torch.finfo(F64).tiny), 0.0)
            tiny = torch.finfo(F64).tiny
            local = torch.where(local > 0, local, mean.reshape(-1, *[1] * (local.ndim - 1)))
            self.row_scale = local.clamp_min(tiny).rsqrt()

    def mobility(self, x: Tensor) -> Tensor:
        """``W M x`` for a field ``x`` (batch, channels, *grid)."""
        if self.weight is not None:
            x = x * self.weight
        if self.mask is not None:
            x = x * self.mask.to(x.device)
        return x

    def move(self, lam: Tensor) -> Tensor:
        """``W M C^T lam``."""
        return self.mobility(self.op.transpose(lam))

    def matvec(self, lam: Tensor) -> Tensor:
        return self.op.apply(self.move(lam))

    def precondition(self, r: Tensor) -> Tensor:
        if self._cap_key is not None:
            cap = _capacitance(*self._cap_key, r.device)
            if cap is not None:
                return cap(r)
        if self.row_scale is None:
            return self.pre(r)
        return self.row_scale * self.pre(self.row_scale * r)

    def solve(
        self, rhs: Tensor, scale: Tensor, call: str, check: bool = True
    ) -> tuple[Tensor, int]:
        """``K^+ rhs`` by preconditioned CG; returns ``(lam, iterations)``. Raises when the
        rows cannot hold (a residual no move reaches)."""
        flux = gauss_flux(self.op, self.mask, rhs) if check else None
        if flux is not None:
            size, net = flux
            if bool((net.abs() > INCONSISTENT_RTOL * size * scale).any()):
                raise IncompatibleConstraintsError(
                    _net_flux_message(float(net.abs().max()), call, self.op)
                    + " (the wall values' flux through the walls minus the integrated "
                    "right-hand side, with the stencil's exact quadrature)"
                )
        exact_null = not self.pre.approximate
        if check and exact_null and self.mask is None and self.weight is None and self.op.separable:
            off = self.pre.null_part(rhs).flatten(1).abs().amax(1)  # exact: C C^T's null space
            if bool((off > INCONSISTENT_RTOL * scale).any()):
                raise IncompatibleConstraintsError(
                    _net_flux_message(float(off.max()), call, self.op)
                    + " (the largest entry of the right-hand side's component in the null space "
                    "of C^T: the combinations of rows that every field leaves at zero)"
                )
        lam, res, it = pcg(self.matvec, self.precondition, rhs, scale, patience=self.patience)
        rel = float((res / scale).amax()) if res.numel() else 0.0
        if rel > ACCEPT_RTOL:
            if not self.op.separable:
                raise SingularConstraintError(
                    f"{call}: CG on the local rows stopped at a relative residual of {rel:.3e} "
                    f"after {it} iterations. This operator is not separable (a channel is "
                    "differentiated along several axes, e.g. u_t - nu u_xx on a (t, x) grid): "
                    "one row per node on one channel makes C square, and with central "
                    "differences in time C is nearly singular (its near-null fields are the "
                    "growing modes of the leapfrog scheme, held only by the one-sided rows at "
                    "the time walls). Measured for u_t - 0.1 u_xx: cond(C) = 1.6e6 on 17 x 17, "
                    "3.6e7 on 25 x 25, 3.2e8 on 33 x 33; CG works on C C^T, whose condition "
                    "number is the square, beyond float64's 1/eps from 25 x 25 on: no solver "
                    "of these normal equations reaches the rows' residual target there (the "
                    "limit is the operator's, not the preconditioner's). Use a coarser grid "
                    "(17 x 17 converges for nu = 0.1, 13 x 13 for nu = 0.01), or state the law "
                    "on several channels (the flux as its own channel: cl.Continuity, "
                    "separable and solved exactly), or the data may be incompatible with the "
                    "rows."
                )
            if rel > INCONSISTENT_RTOL:
                raise IncompatibleConstraintsError(
                    f"{call}: the local constraint cannot hold with these data: CG left a "
                    f"relative residual of the rows of {rel:.3e} after {it} iterations: the "
                    "right-hand side and the wall values have a part that no field on the free "
                    "nodes can produce (a net flux, e.g. at a corner where the wall values "
                    "alone fix every node a row reads). Make the wall values compatible (zero "
                    "net flux; continuous at corners)."
                )
            raise ConstraintViolationError(
                f"{call}: the local solve reached a relative residual of {rel:.3e} after {it} "
                f"iterations (target {CG_RTOL:.0e}). This is a bug: please report it with the "
                "constraints and the output shape."
            )
        return lam, it


@lru_cache(maxsize=16)
def _capacitance(key: tuple, free: tuple | None, mask_key: tuple | None, device):
    """The cached capacitance solve of ``C M C^T`` (None: not confined to few nodes)."""
    from .capacitance import build_capacitance

    op = LocalOperator(*key)
    mask = None if mask_key is None else _mask_from_key(mask_key).to(device)
    pre = fast_solve(key, free)
    system = System(op, mask, None)
    return build_capacitance(system.matvec, pre, op.grid, device)


def pcg(
    matvec: Callable[[Tensor], Tensor],
    precond: Callable[[Tensor], Tensor],
    b: Tensor,
    scale: Tensor,
    rtol: float = CG_RTOL,
    maxiter: int = MAXITER,
    patience: int = PATIENCE,
) -> tuple[Tensor, Tensor, int]:
    """Preconditioned CG on a symmetric PSD ``K`` (singular allowed, consistent ``b``), batched.

    Stops when every sample's ``max |b - K x|`` is below ``rtol * scale`` (batch,), or when the
    residual stops decreasing (incompatible data). Returns ``(x, max |residual| per sample,
    iterations)``.
    """
    dims = tuple(range(1, b.ndim))
    view = (-1, *[1] * (b.ndim - 1))
    x = torch.zeros_like(b)
    r = b.clone()
    res = r.abs().amax(dims)
    res0 = res.clone()
    best, since = res.clone(), 0
    if bool((res <= rtol * scale).all()):
        return x, res, 0
    z = precond(r)
    p = z
    rz = (r * z).sum(dims)
    it = 0
    while it < maxiter:
        it += 1
        kp = matvec(p)
        pkp = (p * kp).sum(dims)
        ok = pkp > 0
        alpha = torch.where(ok, rz / torch.where(ok, pkp, 1.0), 0.0)
        x = x + alpha.reshape(view) * p
        r = r - alpha.reshape(view) * kp
        res = r.abs().amax(dims)
        if bool((res <= rtol * scale).all()):
            break
        if bool((res > GROWTH * res0).any()):
            break  # growing far beyond the start: incompatible data
        improved = res < 0.5 * best
        best = torch.minimum(best, res)
        since = 0 if bool(improved.any()) else since + 1
        if since > patience:
            break  # stagnating: incompatible data (or a residual at rounding)
        z = precond(r)
        rz_new = (r * z).sum(dims)
        ok = rz != 0
        beta = torch.where(ok, rz_new / torch.where(ok, rz, 1.0), 0.0)
        p = z + beta.reshape(view) * p
        rz = rz_new
    return x, res, it
