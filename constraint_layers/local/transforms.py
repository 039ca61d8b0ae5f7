"""Fast orthogonal transforms along one axis, by ``torch.fft`` (private).

The orthonormal DCT-II ``T`` (``T[k, j] = s_k cos(pi k (2j + 1) / 2n)``, ``s_0 = sqrt(1/n)``,
``s_k = sqrt(2/n)``) and its inverse ``T^T`` (the DCT-III), each one FFT of length ``n`` of the
even/odd reordering of the input (Makhoul, 1980): ``O(n log n)``.

``T`` diagonalises every symmetric stencil ``g`` (``g_{-k} = g_k``) closed by the half-sample
even extension ``x_{-1-j} = x_j``, ``x_{n+j} = x_{n-1-j}`` at both ends; its eigenvalues are
``g_0 + 2 sum_k g_k cos(pi k q / n)`` (:func:`dct_eigenvalues`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["dct", "dct_eigenvalues", "dct_matrix", "idct"]

F64 = torch.float64


@lru_cache(maxsize=64)
def _twiddle(n: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(s_k exp(-i pi k / 2n), exp(i pi k / 2n))`` over ``k``."""
    k = torch.arange(n, dtype=F64)
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=F64)
    s[0] = math.sqrt(1.0 / n)
    ang = -math.pi * k / (2 * n)
    fwd = torch.polar(s, ang)
    inv = torch.polar(torch.ones_like(s), -ang)
    return fwd.to(device), inv.to(device)


def dct(x: Tensor) -> Tensor:
    """``T x`` along the last axis (float64)."""
    n = x.shape[-1]
    v = torch.cat([x[..., 0::2], x[..., 1::2].flip(-1)], -1)
    fwd, _ = _twiddle(n, x.device)
    return (torch.fft.fft(v, dim=-1) * fwd).real


def idct(c: Tensor) -> Tensor:
    """``T^T c`` along the last axis (float64)."""
    n = c.shape[-1]
    _, inv = _twiddle(n, c.device)
    s = _scales(n, c.device)
    y = c / s  # the unnormalised DCT-II
    rev = torch.cat([torch.zeros_like(y[..., :1]), y[..., 1:].flip(-1)], -1)  # Y_{n-k}, Y_n = 0
    # V_k = exp(i pi k / 2n) (Y_k - i Y_{n-k}); v = ifft(V) (Makhoul), unnormalised inverse / n
    v = torch.fft.ifft(inv * torch.complex(y, -rev), dim=-1).real
    half = (n + 1) // 2
    out = torch.empty_like(c)
    out[..., 0::2] = v[..., :half]
    out[..., 1::2] = v[..., half:].flip(-1)
    return out


@lru_cache(maxsize=64)
def _scales(n: int, device: torch.device) -> Tensor:
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=F64)
    s[0] = math.sqrt(1.0 / n)
    return s.to(device)


@lru_cache(maxsize=64)
def dct_matrix(n: int) -> Tensor:
    """The dense ``T`` (n, n) float64 (setup and tests)."""
    return dct(torch.eye(n, dtype=F64)).T.contiguous()  # dct(e_i) is the column i of T


def dct_eigenvalues(stencil: Tensor, n: int) -> Tensor:
    """The eigenvalues (n,) of the symmetric ``stencil`` (offsets ``-K..K``, length ``2K + 1``)
    closed by the half-sample even extension, in the order of ``T``'s rows."""
    k = (stencil.numel() - 1) // 2
    q = torch.arange(n, dtype=F64)
    lam = torch.full((n,), float(stencil[k]), dtype=F64)
    for j in range(1, k + 1):
        lam = lam + 2 * float(stencil[k + j]) * torch.cos(math.pi * j * q / n)
    return lam
