"""Local rows with totals (a few dense rows) in one call: the Schur complement over the local
solver, equal to the dense Euclidean projection onto all rows."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div

import constraint_layers as cl
from constraint_layers.errors import IncompatibleConstraintsError
from constraint_layers.functional import enforce_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def dense_joint(u, A, d, free):
    """``z - pinv(A M) (A z - d)`` with ``z`` the output with the wall nodes at 0 (SVD)."""
    z = (u.to(F64) * free).flatten(1)
    return (z - (torch.linalg.pinv(A * free.flatten()) @ (z @ A.T - d).T).T).reshape(u.shape)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", ["walls", "periodic", "no_slip"])
def test_divergence_free_with_totals_equals_dense(case, dtype):
    g = torch.Generator().manual_seed(8)
    grid = (9, 8)
    u = torch.randn(3, 2, *grid, dtype=F64, generator=g).to(dtype)
    per = case == "periodic"
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1)) if case == "no_slip" else ()
    totals = (
        cl.Conservation.integral(0.3, dim=(0, 1), channels=0),
        cl.Conservation.integral(-0.2, dim=(0, 1), channels=1),
    )
    out = enforce_local(u, cl.DivergenceFree(periodic=per), *walls, *totals)
    hs = [1 / n for n in grid] if per else [1 / (n - 1) for n in grid]
    C = dense_div((2, *grid), hs, periodic=per)
    n = 2 * math.prod(grid)
    G = torch.cat([t.rows(u.shape).dense(n) for t in totals])
    A = torch.cat([C, G])
    d = torch.cat([torch.zeros(math.prod(grid), dtype=F64), torch.tensor([0.3, -0.2], dtype=F64)])
    free = torch.ones(2, *grid, dtype=torch.bool)
    if walls:
        free[:, 0] = free[:, -1] = free[:, :, 0] = free[:, :, -1] = False
    ref = dense_joint(u, A, d, free)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    x = out.to(F64).flatten(1)
    assert float((x @ G.T - d[-2:]).abs().max()) <= TOL[dtype]
    assert float((x @ C.T).abs().max()) <= TOL[dtype] * float(C.abs().sum(1).max() * x.abs().max())


def test_totals_in_wrap_gradcheck_and_incompatible_totals():
    tot = cl.Conservation.integral(0.5, dim=(0, 1), channels=0)
    model = cl.wrap(torch.nn.Identity(), cl.DivergenceFree(), tot, debug=True)
    u = torch.randn(1, 2, 5, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(model, (u,))
    # a total that is a combination of the local rows (the sum of the divergence over the nodes)
    # is fixed by them to 0: any other value is incompatible, 0 is redundant and accepted
    C = dense_div((2, 6, 6), [1 / 5, 1 / 5])
    y = torch.randn(1, 2, 6, 6, dtype=F64)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    bad = cl.Conservation(C.sum(0, keepdim=True), torch.tensor([1.0], dtype=F64))
    with pytest.raises(IncompatibleConstraintsError, match="totals cannot hold"):
        enforce_local(y, cl.DivergenceFree(), *walls, bad)
    fine = cl.Conservation(C.sum(0, keepdim=True), torch.tensor([0.0], dtype=F64))
    same = enforce_local(y, cl.DivergenceFree(), *walls, fine)
    assert float((same - enforce_local(y, cl.DivergenceFree(), *walls)).abs().max()) < 1e-12
