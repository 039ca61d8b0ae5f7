"""Independent float64 references for the local-constraint tests (dense, small grids)."""

from __future__ import annotations

import math

import torch

F64 = torch.float64


def dense_div(shape, hs, periodic=False):
    """The divergence as a dense matrix (M, channels * prod(grid)), built by finite differences
    of unit vectors: ``torch.gradient(edge_order=2)`` with walls, central differences that wrap
    (``torch.roll``) when periodic."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *shape)
    d = len(shape) - 1
    div = 0
    for j in range(d):
        x = eye[:, j]
        if periodic:
            g = (torch.roll(x, -1, j + 1) - torch.roll(x, 1, j + 1)) / (2 * hs[j])
        else:
            g = torch.gradient(x, spacing=hs[j], dim=j + 1, edge_order=2)[0]
        div = div + g
    return div.reshape(n, -1).T


def dense_projection(u, C, f=None, free=None, weight=None):
    """``z - W M C^T (C W M C^T)^+ (C z - f)`` per sample, float64 pseudo-inverse (``free``:
    flat bool mask of the nodes that move; ``weight``: (batch, N) diagonal metric)."""
    x = u.to(F64).flatten(1)
    out = []
    for b in range(x.shape[0]):
        w = torch.ones(x.shape[1], dtype=F64) if weight is None else weight[b].to(F64).flatten()
        if free is not None:
            w = w * free.flatten().to(F64)
        r = C @ x[b] - (0 if f is None else f[b].flatten().to(F64))
        # W^(1/2) pinv(C W^(1/2)) r: the SVD of C W^(1/2), not of the squared system
        s = w.sqrt()
        out.append(x[b] - s * (torch.linalg.pinv(C * s, rtol=1e-12) @ r))
    return torch.stack(out).reshape(u.shape)


def dense_conditioning(m, v, C, f=None):
    """Mean and marginal variances of ``N(m, diag(v))`` conditioned on ``C u = f`` (dense, by
    the SVD of ``B = C diag(v)^(1/2)``: mean ``m - v^(1/2) B^+ (C m - f)``, variances
    ``v (1 - diag(B^+ B))``)."""
    means, variances = [], []
    for b in range(m.shape[0]):
        s = v[b].flatten().to(F64).sqrt()
        B = C * s
        U, sv, Vh = torch.linalg.svd(B, full_matrices=False)
        keep = sv > 1e-12 * sv.max()
        Vr = Vh[keep]
        r = C @ m[b].flatten().to(F64) - (0 if f is None else f[b].flatten().to(F64))
        means.append(m[b].flatten().to(F64) - s * (Vr.T @ ((U[:, keep].T @ r) / sv[keep])))
        variances.append(s.square() * (1 - Vr.square().sum(0)))
    return torch.stack(means).reshape(m.shape), torch.stack(variances).reshape(m.shape)


def fft_divfree(u, hs):
    """The periodic central-difference div-free projection by ``torch.fft.fftn`` (full complex
    transform, symbols ``i sin(2 pi k / n) / h`` computed here)."""
    d = u.ndim - 2
    dims = tuple(range(2, 2 + d))
    U = torch.fft.fftn(u.to(F64), dim=dims)
    grid = u.shape[2:]
    syms = []
    for j, n in enumerate(grid):
        k = torch.arange(n, dtype=F64)
        s = torch.sin(2 * math.pi * k / n) / hs[j]
        s[(2 * torch.arange(n)) % n == 0] = 0.0
        view = [1] * d
        view[j] = n
        syms.append((1j * s).reshape(view).expand(grid))
    S = torch.stack(syms)  # (d, *grid)
    norm2 = S.abs().square().sum(0)
    r = (S * U).sum(1)
    coef = torch.where(norm2 > 1e-20, r / torch.where(norm2 > 1e-20, norm2, 1.0), 0.0)
    U = U - S.conj() * coef.unsqueeze(1)
    return torch.fft.ifftn(U, dim=dims).real
