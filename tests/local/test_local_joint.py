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


@pytest.mark.parametrize("case", ["walls", "periodic", "no_slip"])
@pytest.mark.parametrize("seed", range(3))
def test_bounds_with_totals_equal_dense_active_set(case, seed):
    from constraint_layers._bounded.general import project_bounded

    g = torch.Generator().manual_seed(10 + seed)
    grid = (8, 7)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g)
    per = case == "periodic"
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1)) if case == "no_slip" else ()
    hs = [1 / n for n in grid] if per else [1 / (n - 1) for n in grid]
    C = dense_div((2, *grid), hs, periodic=per)
    # no-slip: the rows nearly fix the total of u_x (to 0 in the continuum): a small value
    value = 0.005 if walls else 0.05
    total = cl.Conservation.integral(value, dim=(0, 1), channels=0)
    out = enforce_local(u, cl.DivergenceFree(periodic=per), *walls, total, cl.Bounds(-0.8, 0.9))
    assert float(out.min()) >= -0.8 and float(out.max()) <= 0.9
    free = torch.ones(2, *grid, dtype=torch.bool)
    if walls:
        free[:, 0] = free[:, -1] = free[:, :, 0] = free[:, :, -1] = False
    n = 2 * math.prod(grid)
    G = total.rows(u.shape).dense(n)
    A = torch.cat([C, G])
    e = torch.zeros(2, A.shape[0], dtype=F64)
    e[:, -1] = value
    zero = torch.zeros((), dtype=F64)
    lo = torch.where(free, zero - 0.8, zero).expand(2, -1, -1, -1).reshape(2, n)
    hi = torch.where(free, zero + 0.9, zero).expand(2, -1, -1, -1).reshape(2, n)
    ref = project_bounded((u * free).flatten(1), A, e, lower=lo, upper=hi)
    assert float((out.flatten(1) - ref).abs().max()) <= 1e-10
    assert float((out.flatten(1) @ G.T - value).abs().max()) <= 1e-10


def test_bounds_with_totals_infeasible_raises():
    # no-slip, div-free: the total of u_x is nearly fixed; 0.05 needs values beyond the bounds
    # (the dense exact solver agrees: no point within the bounds satisfies the rows)
    u = torch.randn(1, 2, 8, 7, dtype=F64, generator=torch.Generator().manual_seed(10))
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    total = cl.Conservation.integral(0.05, dim=(0, 1), channels=0)
    with pytest.raises(cl.errors.IncompatibleConstraintsError, match="cannot hold together"):
        enforce_local(u, cl.DivergenceFree(), *walls, total, cl.Bounds(-0.8, 0.9))


def test_bounds_with_totals_gradcheck():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 2, 5, 6, dtype=F64, generator=g, requires_grad=True)
    total = cl.Conservation.integral(0.05, dim=(0, 1), channels=0)
    bounds = cl.Bounds(-0.8, 0.9)
    out = enforce_local(u.detach(), cl.DivergenceFree(), total, bounds)
    assert bool(((out == -0.8) | (out == 0.9)).any())  # an active bound

    def f(u):
        return enforce_local(u, cl.DivergenceFree(), total, bounds)

    assert torch.autograd.gradcheck(f, (u,), eps=1e-7, fast_mode=True)
