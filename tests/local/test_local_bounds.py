"""Bounds with local rows (deterministic outputs): equal to the dense exact active-set solver
(Goldfarb-Idnani, ``constraint_layers._bounded.general.project_bounded``) on random cases."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div

import constraint_layers as cl
from constraint_layers._bounded.general import project_bounded
from constraint_layers.functional import enforce_local

F64 = torch.float64


@pytest.mark.parametrize("case", ["walls", "periodic", "no_slip"])
@pytest.mark.parametrize("seed", range(6))
def test_bounded_divergence_free_equals_dense_active_set(case, seed):
    g = torch.Generator().manual_seed(seed)
    grid = (8, 7)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g)
    per = case == "periodic"
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1)) if case == "no_slip" else ()
    hs = [1 / n for n in grid] if per else [1 / (n - 1) for n in grid]
    C = dense_div((2, *grid), hs, periodic=per)
    out = enforce_local(u, cl.DivergenceFree(periodic=per), *walls, cl.Bounds(-0.8, 0.9))
    assert float(out.min()) >= -0.8 and float(out.max()) <= 0.9  # exactly
    free = torch.ones(2, *grid, dtype=torch.bool)
    if walls:
        free[:, 0] = free[:, -1] = free[:, :, 0] = free[:, :, -1] = False
        assert bool((out[:, ~free] == 0).all())
    n = 2 * math.prod(grid)
    zero = torch.zeros((), dtype=F64)
    lo = torch.where(free, zero - 0.8, zero).expand(2, -1, -1, -1).reshape(2, n)
    hi = torch.where(free, zero + 0.9, zero).expand(2, -1, -1, -1).reshape(2, n)
    z = (u * free).flatten(1)
    ref = project_bounded(z, C, torch.zeros(2, C.shape[0], dtype=F64), lower=lo, upper=hi)
    assert float((out.flatten(1) - ref).abs().max()) <= 1e-10
    assert float((out.flatten(1) @ C.T).abs().max()) <= 1e-10 * float(C.abs().sum(1).max())


def test_density_non_negative_with_continuity_in_wrap_and_gradients():
    # rho_t + F_x = 0 on (t, x), periodic in x, rho >= 0: a realistic bounded local law
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 2, 7, 8, dtype=F64, generator=g)
    con = cl.Continuity(density=0, flux=1, periodic=(False, True))
    model = cl.wrap(
        torch.nn.Identity(),
        con,
        cl.Bounds(lower=torch.tensor([0.0, -math.inf]).reshape(1, 2, 1, 1)),
        debug=True,
    )
    y = model(u)
    assert float(y[:, 0].min()) >= 0.0
    C = con.rows(u.shape).dense()
    lo = torch.tensor([0.0, -math.inf], dtype=F64).reshape(1, 2, 1, 1).expand_as(u).flatten(1)
    ref = project_bounded(u.flatten(1), C, torch.zeros(2, C.shape[0], dtype=F64), lower=lo)
    assert float((y.flatten(1) - ref).abs().max()) <= 1e-10
    x = u[:1, :, :5, :6].clone().requires_grad_()  # the active set held for the perturbations
    assert torch.autograd.gradcheck(model, (x,), eps=1e-7, fast_mode=True)


def test_bounds_float32_and_refusals():
    u = torch.randn(1, 2, 8, 8)
    out = enforce_local(u, cl.DivergenceFree(), cl.Bounds(-0.5, 0.5))
    assert out.dtype == torch.float32 and float(out.abs().max()) <= 0.5
    C = dense_div((2, 8, 8), [1 / 7, 1 / 7])
    assert float((out.double().flatten(1) @ C.T).abs().max()) <= 1e-5 * float(C.abs().sum(1).max())
    with pytest.raises(ValueError, match="outside the bounds"):
        enforce_local(u, cl.DivergenceFree(), cl.Dirichlet(1.0, dim=0), cl.Bounds(-0.5, 0.5))
    with pytest.raises(NotImplementedError, match="not yet"):
        cl.functional.condition_local(
            u, None, cl.DivergenceFree(), cl.Bounds(0.0), covariance=torch.eye(128)
        )
