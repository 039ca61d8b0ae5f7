"""One-dimensional derivative operators along one grid axis (private).

Each operator ``D`` (first or second derivative along one axis with ``n`` nodes and spacing
``h``) is stated as a band of diagonals, never as a dense matrix over the grid. The operators,
exactly (``u_i`` the value at node ``i``):

``stencil="gradient"``, walls (``periodic=False``): the stencil of
``torch.gradient(u, spacing=h, edge_order=2)``:

- first derivative: ``(u_{i+1} - u_{i-1}) / 2h`` inside; ``(-3 u_0 + 4 u_1 - u_2) / 2h`` at the
  low wall, ``(3 u_{n-1} - 4 u_{n-2} + u_{n-3}) / 2h`` at the high wall (``n >= 3``);
- second derivative: ``(u_{i+1} - 2 u_i + u_{i-1}) / h^2`` inside;
  ``(2 u_0 - 5 u_1 + 4 u_2 - u_3) / h^2`` at the low wall and its mirror image at the high wall,
  second order (``n >= 4``).

``stencil="gradient"``, ``periodic=True``: the same interior stencils at every node, indices
taken modulo ``n`` (a grid without a repeated end node; ``n >= 3``). Fourier symbols: first
derivative ``i sin(2 pi k / n) / h`` (zero at ``k = 0`` and, for even ``n``, at ``k = n / 2``),
second derivative ``-4 sin^2(pi k / n) / h^2``.

``stencil="spectral"`` (periodic only): multiplication of the discrete Fourier coefficients by
``i 2 pi k / L`` (first derivative; ``L = n h``; the Nyquist coefficient of an even ``n`` is set to
zero, so that the operator maps real fields to real fields and ``D^T = -D``) or ``-(2 pi k / L)^2``
(second derivative), ``k`` the signed integer wavenumber.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["STENCILS", "Stencil1D", "min_nodes", "stencil_1d"]

F64 = torch.float64
#: The stencil families (see the module docstring).
STENCILS = ("gradient", "spectral")


def min_nodes(order: int, periodic: bool) -> int:
    """The fewest nodes an axis needs for a derivative of ``order``."""
    return 3 if (periodic or order == 1) else 4


class Stencil1D:
    """A derivative along one axis: ``apply`` computes ``D u``, ``transpose`` computes ``D^T v``.

    Banded operators hold ``offsets`` and ``weights`` (``weights[j, i] = D[i, i + offsets[j]]``,
    indices modulo ``n`` when periodic); the spectral one holds its Fourier ``symbol``.
    """

    def __init__(self, n: int, h: float, order: int, stencil: str, periodic: bool) -> None:
        self.n, self.h, self.order, self.stencil, self.periodic = n, h, order, stencil, periodic
        self._on_device: dict = {}
        self._zeros: dict = {}
        self.offsets: tuple[int, ...] = ()
        self.weights: Tensor | None = None
        self.symbol_rfft: Tensor | None = None
        if stencil == "spectral":
            self.symbol_rfft = _spectral_symbol(n, h, order)
            return
        if periodic:
            interior = [(-1, -0.5 / h), (1, 0.5 / h)] if order == 1 else _second(h)
            self.offsets = tuple(o for o, _ in interior)
            self.weights = torch.tensor([[w] * n for _, w in interior], dtype=F64)
            self._bands()
            return
        rows = _wall_rows(n, h, order)
        offsets = sorted({j - i for i, row in enumerate(rows) for j, _ in row})
        weights = torch.zeros((len(offsets), n), dtype=F64)
        for i, row in enumerate(rows):
            for j, w in row:
                weights[offsets.index(j - i), i] += w
        self.offsets = tuple(offsets)
        self.weights = weights
        self._bands()

    def _bands(self) -> None:
        """The band of ``D`` and of ``D^T``: (n, 2K + 1), ``band[i, j] = D[i, i + j - K]``."""
        k = max(abs(o) for o in self.offsets)
        d = torch.zeros((self.n, self.n), dtype=F64)
        i = torch.arange(self.n)
        for j, o in enumerate(self.offsets):
            cols = (i + o) % self.n if self.periodic else i + o
            ok = (cols >= 0) & (cols < self.n)
            d[i[ok], cols[ok]] += self.weights[j, ok]
        self.bandwidth = k
        self.band = _band(d, k, self.periodic)
        self.band_t = _band(d.T.contiguous(), k, self.periodic)

    # ----------------------------------------------------------------------------- apply
    def apply(self, u: Tensor, axis: int) -> Tensor:
        """``D u`` along ``axis`` of ``u`` (float64 or complex128)."""
        if self.symbol_rfft is not None:
            return _fourier(u, axis, self.symbol_rfft)
        return self._banded(u, axis, transpose=False)

    def transpose(self, v: Tensor, axis: int) -> Tensor:
        """``D^T v`` along ``axis``."""
        if self.symbol_rfft is not None:
            return _fourier(v, axis, self.symbol_rfft.conj())
        return self._banded(v, axis, transpose=True)

    def _banded(self, u: Tensor, axis: int, transpose: bool) -> Tensor:
        """``sum_j W[i, j] u[i + j - K]`` over the ``2K + 1`` window of each node: ``W`` the band
        of ``D`` (or of ``D^T``), indices modulo ``n`` when periodic. One shifted slice per
        non-zero diagonal (walls: along the axis in place, no padding or transposed copy)."""
        axis = axis % u.ndim
        x = u.movedim(axis, -1)
        k = self.bandwidth
        key = (x.device, x.dtype, transpose)
        w = self._on_device.get(key)
        if w is None:  # one copy per device and dtype, not one per call
            w = (self.band_t if transpose else self.band).to(device=x.device, dtype=x.dtype)
            self._on_device[key] = w
        n = self.n
        if not self.periodic:  # one shifted slice per diagonal along the axis, no padding
            view = (-1,) + (1,) * (u.ndim - 1 - axis)
            out = u * w[:, k].reshape(view)
            for j in range(2 * k + 1):
                o = j - k  # out[i] += W[i, j] u[i + o] for 0 <= i + o < n
                if o == 0 or self._zero_band(transpose, j):
                    continue
                lo, hi = max(0, -o), n - max(0, o)
                out.narrow(axis, lo, hi - lo).add_(
                    u.narrow(axis, lo + o, hi - lo) * w[lo:hi, j].reshape(view)
                )
            return out
        lead = x.shape[:-1]
        flat = x.reshape(-1, 1, n)
        padded = torch.nn.functional.pad(flat, (k, k), mode="circular").reshape(*lead, n + 2 * k)
        out = None  # one shifted slice per diagonal: no (..., n, 2K + 1) window tensor
        for j in range(2 * k + 1):
            if self._zero_band(transpose, j):
                continue
            term = padded[..., j : j + n] * w[:, j]
            out = term if out is None else out + term
        return out.movedim(-1, axis)

    def _zero_band(self, transpose: bool, j: int) -> bool:
        """Whether diagonal ``j`` of the band (of ``D`` or ``D^T``) is zero everywhere."""
        key = (transpose, j)
        hit = self._zeros.get(key)
        if hit is None:
            band = self.band_t if transpose else self.band
            hit = bool((band[:, j] == 0).all()) and j != self.bandwidth
            self._zeros[key] = hit
        return hit

    # ------------------------------------------------------------------- the fast solvers
    def symbol(self) -> Tensor:
        """The Fourier symbol over ``fftfreq(n)`` (periodic operators only), complex128."""
        if not self.periodic:
            raise ValueError("Stencil1D.symbol: only periodic operators have a symbol.")
        k = torch.fft.fftfreq(self.n, 1.0 / self.n, dtype=F64).round()
        if self.stencil == "spectral":
            return _spectral_full(self.n, self.h, self.order)
        theta = 2 * math.pi * k / self.n
        if self.order == 1:
            s = torch.sin(theta) / self.h
            s = torch.where(torch.remainder(2 * k, self.n) == 0, 0.0, s)  # exact zeros
            return torch.complex(torch.zeros_like(s), s)
        s = -4 * torch.sin(theta / 2).square() / self.h**2
        s = torch.where(torch.remainder(k, self.n) == 0, 0.0, s)
        return torch.complex(s, torch.zeros_like(s))

    def dense(self) -> Tensor:
        """The (n, n) float64 matrix (a Kronecker factor, for the separable solve)."""
        return self.apply(torch.eye(self.n, dtype=F64), 0)

    def abs_row_sum(self) -> float:
        """``max_i sum_j |D_ij|``: the size of the terms one row balances, per unit value."""
        if self.weights is not None:
            return float(self.weights.abs().sum(0).max())
        return float(self.dense().abs().sum(1).max())


def _band(d: Tensor, k: int, periodic: bool) -> Tensor:
    n = d.shape[0]
    i = torch.arange(n).unsqueeze(1)
    cols = i + torch.arange(-k, k + 1).unsqueeze(0)  # (n, 2K + 1)
    if periodic:
        return d.gather(1, cols % n)
    ok = (cols >= 0) & (cols < n)
    return torch.where(ok, d.gather(1, cols.clamp(0, n - 1)), 0.0)


def _second(h: float) -> list[tuple[int, float]]:
    return [(-1, 1 / h**2), (0, -2 / h**2), (1, 1 / h**2)]


def _wall_rows(n: int, h: float, order: int) -> list[list[tuple[int, float]]]:
    """Row ``i``: the (column, weight) pairs of ``D`` with one-sided second-order wall rows."""
    if order == 1:
        c = 0.5 / h
        rows = [[(0, -3 * c), (1, 4 * c), (2, -c)]]
        rows += [[(i - 1, -c), (i + 1, c)] for i in range(1, n - 1)]
        rows += [[(n - 3, c), (n - 2, -4 * c), (n - 1, 3 * c)]]
        return rows
    c = 1 / h**2
    rows = [[(0, 2 * c), (1, -5 * c), (2, 4 * c), (3, -c)]]
    rows += [[(i - 1, c), (i, -2 * c), (i + 1, c)] for i in range(1, n - 1)]
    rows += [[(n - 4, -c), (n - 3, 4 * c), (n - 2, -5 * c), (n - 1, 2 * c)]]
    return rows


@lru_cache(maxsize=64)
def _spectral_symbol(n: int, h: float, order: int) -> Tensor:
    """The spectral symbol over ``rfftfreq(n)``."""
    return _spectral_full(n, h, order)[: n // 2 + 1]


@lru_cache(maxsize=64)
def _spectral_full(n: int, h: float, order: int) -> Tensor:
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=F64).round()
    if n % 2 == 0:
        nyq = k.abs() == n // 2
        k = k.abs().where(nyq, k)  # +n/2: as rfft sees it
    else:
        nyq = torch.zeros_like(k, dtype=torch.bool)
    w = 2 * math.pi * k / (n * h)
    if order == 1:
        w = torch.where(nyq, 0.0, w)
        return torch.complex(torch.zeros_like(w), w)
    return torch.complex(-w.square(), torch.zeros_like(w))


def _fourier(u: Tensor, axis: int, symbol: Tensor) -> Tensor:
    n = u.shape[axis]
    shape = [1] * u.ndim
    shape[axis] = -1
    s = symbol.to(u.device).reshape(shape)
    return torch.fft.irfft(torch.fft.rfft(u, dim=axis) * s, n=n, dim=axis)


@lru_cache(maxsize=256)
def stencil_1d(n: int, h: float, order: int, stencil: str, periodic: bool) -> Stencil1D:
    """The (cached) operator for one axis."""
    return Stencil1D(n, h, order, stencil, periodic)
