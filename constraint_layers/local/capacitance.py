"""The exact solve of a system that differs from a fast one near a few nodes (private).

``K = C M C^T`` (Dirichlet nodes eliminated by the mask ``M``) is not a Kronecker sum: the rows
next to the fixed nodes lose the terms of those nodes. The fast solve ``P`` (a Kronecker sum,
made positive definite on its null space, see :class:`~constraint_layers.local.solve.FastSolve`)
differs from ``K`` only on a few rows and columns ``B`` (the nodes next to the walls):
``K = P + I_B E I_B^T`` with ``E`` small (|B| x |B|, symmetric). The capacitance matrix method
(Woodbury's identity) then solves ``K`` exactly with two fast solves and one |B| x |B| product:

    E = V diag(l) V^T,   S = diag(1 / l) + V^T (P^-1)_BB V,   H = V S^+ V^T,
    K^+ r = P^-1 r - P^-1 I_B H (P^-1 r)_B.

``S^+`` by its eigendecomposition (eigenvalues below :data:`NULL_RTOL` of the largest dropped:
where ``K`` is singular, the solve is exact on its range, which is where consistent right-hand
sides lie). The set ``B`` is found by probing ``K - P`` with random fields (the rows where it
does not vanish); everything is computed once per operator and mask and cached. CG keeps its
stop on the rows' residual: with this preconditioner it stops after one iteration (two where
rounding needs a polish).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._tolerance import CAPACITANCE_MAX_NODES, CAPACITANCE_SUPPORT_RTOL, NULL_RTOL

__all__ = ["Capacitance", "build_capacitance"]

F64 = torch.float64
#: Unit fields per batch when probing the fast solve (memory: this many grids).
_CHUNK = 64


class Capacitance:
    """``K^+`` as ``P^-1`` corrected on the nodes ``B`` and on ``P``'s null space (see the module
    docstring). The correction is stored over the nodes: ``H = [V 0; 0 I] S^+ [V 0; 0 I]^T``
    split into its node blocks (``bb``: |B| x |B|, ``bn``, ``nn`` with the k null vectors), so an
    application costs two fast solves and one |B| x |B| product."""

    def __init__(self, solve, index: Tensor, h: Tensor, null: Tensor, low: float) -> None:
        m = index.numel()
        self.solve = solve  # P_reg^-1: (batch, *grid) -> (batch, *grid)
        self.index, self.null, self.low = index, null, low
        self.bb, self.bn, self.nn = h[:m, :m], h[:m, m:], h[m:, m:]
        self._on_device: dict = {}

    def _device(self, device: torch.device) -> tuple[Tensor, ...]:
        hit = self._on_device.get(device)
        if hit is None:
            hit = tuple(t.to(device) for t in (self.index, self.null, self.bb, self.bn, self.nn))
            self._on_device[device] = hit
        return hit

    def __call__(self, r: Tensor) -> Tensor:
        """A solution of ``K x = r`` (exact for ``r`` in the range of ``K``): (batch, *grid)."""
        index, null, bb, bn, nn = self._device(r.device)
        z = self.solve(r)
        flat = z.flatten(1)
        zb, zn = flat[:, index], flat @ null.T  # U^T z, over the nodes and the null vectors
        back = torch.zeros_like(flat)
        back[:, index] = zb @ bb + zn @ bn.T  # h symmetric
        out = z - self.solve(back.reshape(r.shape))
        return out - ((zb @ bn + zn @ nn) @ null).reshape(r.shape) / self.low


def build_capacitance(matvec, pre, grid: tuple[int, ...], device) -> Capacitance | None:
    """The capacitance solve of ``K`` (``matvec``) over the fast solve ``pre``
    (:class:`~constraint_layers.local.solve.FastSolve`), or None when ``K - P`` is not confined
    to at most :data:`CAPACITANCE_MAX_NODES` nodes (then CG preconditioned by ``P`` alone).

    ``K = P_reg + I_B E I_B^T - low N^T N`` with ``P_reg = P + low N^T N`` the solve's positive
    definite operator (``N``: ``P``'s null space): Woodbury over ``U = [I_B V, N^T]``."""
    n = 1
    for s in grid:
        n *= s
    g = torch.Generator(device="cpu").manual_seed(0)
    probe = torch.randn((2, *grid), dtype=F64, generator=g).to(device)
    kx, px = matvec(probe), pre.forward(probe)
    size = float(kx.abs().max()) + float(px.abs().max())
    diff = (kx - px).abs().amax(0).flatten()
    index = (diff > CAPACITANCE_SUPPORT_RTOL * size).nonzero().flatten()
    m = int(index.numel())
    if m == 0 or m > min(CAPACITANCE_MAX_NODES, n // 2):
        return None
    # columns of E = K - P and of P_reg^-1 at the nodes B, restricted to B
    e_cols, g_cols = [], []
    for start in range(0, m, _CHUNK):
        idx = index[start : start + _CHUNK]
        unit = torch.zeros((idx.numel(), n), dtype=F64, device=device)
        unit[torch.arange(idx.numel(), device=device), idx] = 1.0
        unit = unit.reshape(-1, *grid)
        d = (matvec(unit) - pre.forward(unit)).flatten(1)
        outside = d.clone()
        outside[:, index] = 0.0
        if float(outside.abs().max()) > CAPACITANCE_SUPPORT_RTOL * size:
            return None  # K - P reaches beyond B: not confined (a probe missed it)
        e_cols.append(d[:, index])
        g_cols.append(pre(unit).flatten(1)[:, index])
    e = torch.cat(e_cols)
    e = 0.5 * (e + e.T)
    gm = torch.cat(g_cols)
    gm = 0.5 * (gm + gm.T)
    lam, v = torch.linalg.eigh(e)
    keep = lam.abs() > NULL_RTOL * lam.abs().amax()
    lam, v = lam[keep], v[:, keep]
    null = pre.null_vectors(device).reshape(-1, n)  # (k, n)
    low = pre.low
    k = null.shape[0]
    nb = null[:, index]  # (k, m)
    a12 = v.T @ nb.T / low
    top = torch.cat([torch.diag(1.0 / lam) + v.T @ gm @ v, a12], 1)
    bottom = torch.cat([a12.T, torch.zeros((k, k), dtype=F64, device=device)], 1)
    s = torch.cat([top, bottom])
    mu, w = torch.linalg.eigh(0.5 * (s + s.T))
    ok = mu.abs() > NULL_RTOL * mu.abs().amax()
    inv = torch.where(ok, 1.0 / torch.where(ok, mu, 1.0), 0.0)
    h = (w * inv) @ w.T
    h = 0.5 * (h + h.T)
    # over the nodes: [V 0; 0 I] h [V 0; 0 I]^T
    r_ = v.shape[1]
    lift = torch.zeros((m + k, r_ + k), dtype=F64, device=device)
    lift[:m, :r_] = v
    lift[m:, r_:] = torch.eye(k, dtype=F64, device=device)
    return Capacitance(pre, index, lift @ h @ lift.T, null, low)
