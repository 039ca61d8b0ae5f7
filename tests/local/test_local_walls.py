"""Local rows with walls of any kind (Neumann, periodic, lifted): the boundary step keeps its
meaning and the rows act on the freedom it leaves; equal to a dense reference built from the
step applied to unit vectors."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div

import constraint_layers as cl
from constraint_layers.functional import enforce_boundary, enforce_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def dense_reference(u, C, walls, f=None, lift=0):
    """``B(v*)``, ``v* = argmin |v - u|`` s.t. ``C B(v) = f``: ``S`` from the step on unit
    vectors, the least-norm move by the SVD of ``C S``."""
    shape = u.shape[1:]
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *shape)
    # S: the homogeneous step (values 0) applied to unit vectors
    homog = [type(w)(0.0, dim=w.dim, side=w.side, channels=w.channels) for w in walls]
    S = enforce_boundary(eye, homog, lift=lift).flatten(1).T
    x = u.to(F64).flatten(1)
    out = []
    for b in range(x.shape[0]):
        z = enforce_boundary(x[b].reshape(1, *shape), walls, lift=lift).flatten()
        r = C @ z - (0 if f is None else f[b].flatten())
        v = x[b] - torch.linalg.pinv(C @ S, rtol=1e-12) @ r
        out.append(enforce_boundary(v.reshape(1, *shape), walls, lift=lift).flatten())
    return torch.stack(out).reshape(u.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_free_slip_channel_equals_dense(dtype):
    # periodic along x (axis 0), walls at y = 0, 1 (axis 1): u_y = 0, d u_x / d n = 0
    g = torch.Generator().manual_seed(0)
    grid = (8, 9)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g).to(dtype)
    walls = [cl.Dirichlet(0.0, dim=1, channels=1), cl.Neumann(0.0, dim=1, channels=0)]
    con = cl.DivergenceFree(periodic=(True, False))
    out = enforce_local(u, con, *walls)
    n = 2 * math.prod(grid)
    eye = torch.eye(n, dtype=F64).reshape(n, 2, *grid)
    dx = (torch.roll(eye[:, 0], -1, 1) - torch.roll(eye[:, 0], 1, 1)) / (2 / 8)
    dy = torch.gradient(eye[:, 1], spacing=1 / 8, dim=2, edge_order=2)[0]
    C = (dx + dy).reshape(n, -1).T
    ref = dense_reference(u, C, walls)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    assert bool((out[:, 1, :, 0] == 0).all() and (out[:, 1, :, -1] == 0).all())
    res = cl.metrics.boundary_error(out.to(F64), walls)
    assert float(res.max()) <= TOL[dtype] * 10
    x = out.to(F64).flatten(1)
    assert float((x @ C.T).abs().max()) <= TOL[dtype] * float(C.abs().sum(1).max() * x.abs().max())


def test_neumann_walls_and_lift_gradcheck():
    g = torch.Generator().manual_seed(1)
    u = torch.randn(1, 2, 5, 6, dtype=F64, generator=g, requires_grad=True)
    walls = (cl.Neumann(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    assert torch.autograd.gradcheck(lambda u: enforce_local(u, cl.DivergenceFree(), *walls), (u,))
    out = enforce_local(u.detach(), cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0), lift=2)
    C = dense_div((2, 5, 6), [1 / 4, 1 / 5])
    ref = dense_reference(u.detach(), C, [cl.Dirichlet(0.0, dim=0)], lift=2)
    assert float((out - ref).abs().max()) <= 1e-10


def test_free_slip_in_wrap_equals_functional():
    walls = [cl.Dirichlet(0.0, dim=1, channels=1), cl.Neumann(0.0, dim=1, channels=0)]
    con = cl.DivergenceFree(periodic=(True, False))
    model = cl.wrap(torch.nn.Identity(), con, *walls, debug=True)
    u = torch.randn(2, 2, 8, 9, dtype=F64, requires_grad=True)
    y = model(u)
    assert torch.equal(y.detach(), enforce_local(u.detach(), con, *walls))
    y.square().sum().backward()
    assert u.grad is not None and bool(torch.isfinite(u.grad).all())
