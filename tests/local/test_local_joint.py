"""Local rows with totals and non-Dirichlet walls (Neumann, periodic, lift) in one call: in the
boundary step's variable, the Euclidean projection onto the local rows and the totals at once,
equal to a dense float64 reference (the step applied to unit vectors)."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div

import constraint_layers as cl
from constraint_layers.functional import enforce_boundary, enforce_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def dense_step_reference(u, rows, rhs, walls, lift=0):
    """``B(v*)``, ``v* = argmin |v - u|`` s.t. ``A B(v) = rhs``: ``S`` from the homogeneous step
    on unit vectors, the least-norm move by the SVD of ``A S``."""
    shape = u.shape[1:]
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *shape)
    homog = [
        w if isinstance(w, cl.Periodic) else type(w)(0.0, dim=w.dim, side=w.side,
                                                     channels=w.channels)
        for w in walls
    ]  # fmt: skip
    S = enforce_boundary(eye, homog, lift=lift).flatten(1).T
    x = u.to(F64).flatten(1)
    out = []
    for b in range(x.shape[0]):
        z = enforce_boundary(x[b].reshape(1, *shape), walls, lift=lift).flatten()
        v = x[b] - torch.linalg.pinv(rows @ S, rtol=1e-12) @ (rows @ z - rhs)
        out.append(enforce_boundary(v.reshape(1, *shape), walls, lift=lift).flatten())
    return torch.stack(out).reshape(u.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["neumann", "lift", "periodic"])
def test_totals_with_step_walls_equal_dense(case, dtype):
    g = torch.Generator().manual_seed(len(case))
    grid = (7, 8)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g).to(dtype)
    lift = 0
    if case == "neumann":
        walls = [cl.Neumann(0.0, dim=0), cl.Dirichlet(0.0, dim=1)]
    elif case == "lift":
        walls, lift = [cl.Dirichlet(0.0, dim=0)], 2
    else:
        walls = [cl.Periodic(dim=0)]
    con = cl.DivergenceFree()
    totals = [cl.Conservation.integral(0.3, dim=(0, 1), channels=0)]
    out = enforce_local(u, con, *walls, *totals, lift=lift)
    C = dense_div((2, *grid), [1 / (n - 1) for n in grid])
    G = totals[0].rows(u.shape).dense(2 * math.prod(grid))
    A = torch.cat([C, G])
    rhs = torch.cat([torch.zeros(C.shape[0], dtype=F64), torch.tensor([0.3], dtype=F64)])
    ref = dense_step_reference(u, A, rhs, walls, lift)
    assert out.dtype == dtype
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    x = out.to(F64).flatten(1)
    assert float((x @ G.T - 0.3).abs().max()) <= TOL[dtype]


def test_totals_with_neumann_walls_gradcheck():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(1, 2, 5, 6, dtype=F64, generator=g, requires_grad=True)
    walls = (cl.Neumann(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    tot = cl.Conservation.integral(0.3, dim=(0, 1), channels=0)
    assert torch.autograd.gradcheck(
        lambda u: enforce_local(u, cl.DivergenceFree(), *walls, tot), (u,)
    )
