"""Conditioning a Gaussian with diagonal variance on local rows: mean and marginal variances
equal to dense float64 conditioning; exact draws (Matheron's rule); implicit gradients."""

from __future__ import annotations

import pytest
import torch
from _local_refs import dense_conditioning, dense_div, dense_projection

import constraint_layers as cl
from constraint_layers.functional import condition_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def problem(grid, batch=2, seed=0, contrast=4.0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, 2, *grid, dtype=F64, generator=g)
    v = 0.1 + contrast * torch.rand(batch, 2, *grid, dtype=F64, generator=g)
    return m, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [False, True])
def test_mean_and_variance_equal_dense_at_16x16(periodic, dtype):
    grid = (16, 16)
    m, v = problem(grid, seed=1)
    con = cl.DivergenceFree(periodic=periodic)
    hs = [1 / 16] * 2 if periodic else [1 / 15] * 2
    C = dense_div((2, *grid), hs, periodic=periodic)
    post = condition_local(m.to(dtype), v.to(dtype), con)
    mean, var = dense_conditioning(m, v, C)
    assert post.mean.dtype == dtype and post.variance.dtype == dtype
    assert float((post.mean.to(F64) - mean).abs().max()) <= TOL[dtype] * float(m.abs().max())
    assert float((post.variance.to(F64) - var).abs().max()) <= TOL[dtype] * float(v.max())
    r = post.mean.to(F64).flatten(1) @ C.T
    assert float(r.abs().max()) <= TOL[dtype] * float(C.abs().sum(1).max() * m.abs().max())


def test_no_slip_walls_zero_variance_and_dense_reference():
    grid = (10, 9)
    m, v = problem(grid, seed=2)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    post = condition_local(m, v, cl.DivergenceFree(), *walls)
    free = torch.zeros(2, *grid, dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    C = dense_div((2, *grid), [1 / 9, 1 / 8])
    z = m * free
    ref = dense_projection(z, C, free=free, weight=v)
    assert float((post.mean - ref).abs().max()) <= 1e-10
    assert bool((post.mean[:, ~free] == 0).all()) and bool((post.variance[:, ~free] == 0).all())
    Cf = C * free.flatten()  # the rows on the free nodes: condition N(z, diag(v M))
    _, var = dense_conditioning(z, v * free, Cf)
    assert float((post.variance - var).abs().max()) <= 1e-10


def test_samples_are_matheron_draws_and_satisfy_the_rows():
    grid = (8, 8)
    m, v = problem(grid, batch=1, seed=3)
    con = cl.DivergenceFree()
    post = condition_local(m, v, con)
    s = post.sample(4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn((4, *m.shape), dtype=F64, generator=torch.Generator().manual_seed(0))
    prior = (m + v.sqrt() * eps).flatten(0, 1)
    C = dense_div((2, *grid), [1 / 7, 1 / 7])
    ref = dense_projection(prior, C, weight=v.expand(4, *v.shape[1:]))
    assert float((s.flatten(0, 1) - ref).abs().max()) <= 1e-10
    assert float((s.flatten(0, 1).flatten(1) @ C.T).abs().max()) <= 1e-9


def test_gradcheck_mean_in_mean_and_variance():
    m, v = problem((4, 5), batch=1, seed=4, contrast=1.0)
    m.requires_grad_()
    v.requires_grad_()
    con = cl.DivergenceFree()
    assert torch.autograd.gradcheck(lambda m, v: condition_local(m, v, con).mean, (m, v))


def test_variance_beyond_dense_limit_refuses_with_the_estimator():
    m, v = problem((65, 64), batch=1, seed=5, contrast=0.0)
    post = condition_local(m, v, cl.DivergenceFree(periodic=True))
    assert float(cl.DivergenceFree(periodic=True).residual(post.mean).abs().max()) < 1e-8
    with pytest.raises(NotImplementedError, match="estimate_variance"):
        _ = post.variance


def test_negative_variance_raises():
    m, v = problem((6, 6))
    with pytest.raises(ValueError, match="negative"):
        condition_local(m, -v, cl.DivergenceFree())


def test_totals_conditioned_jointly_equal_dense():
    grid = (10, 9)
    m, v = problem(grid, batch=2, seed=6)
    totals = (
        cl.Conservation.integral(0.3, dim=(0, 1), channels=0),
        cl.Conservation.integral(-0.1, dim=(0, 1), channels=1),
    )
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    post = condition_local(m, v, cl.DivergenceFree(), *walls, *totals)
    free = torch.zeros(2, *grid, dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    n = 2 * 90
    C = dense_div((2, *grid), [1 / 9, 1 / 8])
    G = torch.cat([t.rows(m.shape).dense(n) for t in totals])
    A = torch.cat([C, G]) * free.flatten()  # the rows on the free nodes (walls at 0)
    d = torch.cat([torch.zeros(90, dtype=F64), torch.tensor([0.3, -0.1], dtype=F64)])
    mean, var = dense_conditioning(m * free, v * free, A, d.expand(2, -1))
    assert float((post.mean - mean).abs().max()) <= 1e-10
    assert float((post.variance - var).abs().max()) <= 1e-10
    s = post.sample(3, generator=torch.Generator().manual_seed(1)).flatten(2)
    assert float((s @ G.T - d[-2:]).abs().max()) <= 1e-10
    assert float((s @ C.T).abs().max()) <= 1e-8


def test_hutchinson_estimate_within_its_standard_error():
    grid = (12, 12)
    m, v = problem(grid, batch=1, seed=7)
    post = condition_local(m, v, cl.DivergenceFree(), cl.Conservation.integral(0.0, dim=(0, 1)))
    est, se = post.estimate_variance(256, generator=torch.Generator().manual_seed(3))
    exact = post.variance
    assert bool((se > 0).all())
    assert float(((est - exact).abs() / se).max()) < 5.0
    assert float(((est - exact).abs() / se).mean()) < 1.2  # about sqrt(2 / pi) = 0.8
    with pytest.raises(ValueError, match="probes"):
        post.estimate_variance(1)
