"""Bounds with local rows on a Gaussian with diagonal variance, the engine's Gaussian + bounds
semantics: the mean is the bounded projection in the variance metric (equal to the dense exact
active-set solver with that metric); the uncertainty is the equality-only posterior
(``variance="rows"``) or the one conditioned on the active bounds too (``"active"``)."""

from __future__ import annotations

import pytest
import torch
from _local_refs import dense_conditioning, dense_div, dense_projection

import constraint_layers as cl
from constraint_layers._bounded.general import project_bounded
from constraint_layers.functional import condition_local

F64 = torch.float64


def independent(C):
    """The same row space (and rhs 0) with independent rows, for the dense solver."""
    U, sv, _ = torch.linalg.svd(C, full_matrices=False)
    return U[:, sv > 1e-10 * sv.max()].T @ C


def bounded_reference(x, v, C, lo, hi, keep=None):
    """The dense exact active-set solver's active set (Goldfarb-Idnani, variance metric), and the
    exact projection with that active set held (dense pseudo-inverse): the solver's own values
    carry its refinement's rounding (2e-9 measured at contrast 100)."""
    keep = torch.ones(x[0].numel(), dtype=torch.bool) if keep is None else keep
    xf, vf, Ck = x.flatten(1)[:, keep], v.flatten(1)[:, keep], C[:, keep]
    Ci = independent(Ck)
    sol = project_bounded(xf, Ci, torch.zeros(x.shape[0], Ci.shape[0], dtype=F64), weight=vf,
                          lower=lo, upper=hi)  # fmt: skip
    act = (sol <= lo) | (sol >= hi)
    z = torch.where(act, sol, xf)
    return dense_projection(z, Ck, weight=vf * ~act), sol, act


def problem(grid, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, 2, *grid, dtype=F64, generator=g)
    v = 0.2 + 2 * torch.rand(batch, 2, *grid, dtype=F64, generator=g)
    return m, v


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_bounded_mean_in_the_variance_metric_equals_dense_rows_variance(periodic, seed):
    grid = (8, 7)
    m, v = problem(grid, seed=seed)
    con = cl.DivergenceFree(periodic=periodic)
    hs = [1 / n for n in grid] if periodic else [1 / (n - 1) for n in grid]
    C = dense_div((2, *grid), hs, periodic=periodic)
    post = condition_local(m, v, con, cl.Bounds(-0.8, 0.9))
    ref, gi, act = bounded_reference(m, v, C, -0.8, 0.9)
    assert float(post.mean.min()) >= -0.8 and float(post.mean.max()) <= 0.9  # exactly
    mine = post.mean.flatten(1)
    assert torch.equal((mine <= -0.8) | (mine >= 0.9), act) and bool(act.any())
    assert float((mine - ref).abs().max()) <= 1e-10
    assert float((mine - gi).abs().max()) <= 1e-8
    assert float((post.mean.flatten(1) @ C.T).abs().max()) <= 1e-9
    # the Euclidean bounded projection differs: the metric matters
    Ci = independent(C)
    eu = project_bounded(m.flatten(1), Ci, torch.zeros(2, Ci.shape[0], dtype=F64), lower=-0.8,
                         upper=0.9)  # fmt: skip
    assert float((eu - ref).abs().max()) > 1e-3
    # variance="rows": the equality-only posterior, its draws shifted onto the bounded mean
    _, var = dense_conditioning(m, v, C)
    assert float((post.variance - var).abs().max()) <= 1e-10
    s = post.sample(3, generator=torch.Generator().manual_seed(0))
    assert float((s.flatten(2) @ C.T).abs().max()) <= 1e-9
    eq = condition_local(m, v, con)
    s_eq = eq.sample(3, generator=torch.Generator().manual_seed(0))
    assert float((s - s_eq - (post.mean - eq.mean)).abs().max()) <= 1e-10


def test_active_variance_conditions_on_the_active_bounds_with_walls():
    grid = (9, 8)
    m, v = problem(grid, seed=5)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    bounds = cl.Bounds(-0.6, 0.7, variance="active")
    post = condition_local(m, v, cl.DivergenceFree(), *walls, bounds)
    free = torch.zeros(2, *grid, dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    C = dense_div((2, *grid), [1 / 8, 1 / 7])
    w = v * free
    keep = free.flatten()  # the wall values are 0: the rows on the free nodes
    ref, _, _ = bounded_reference(m, v, C, -0.6, 0.7, keep)
    assert float((post.mean.flatten(1)[:, keep] - ref).abs().max()) <= 1e-10
    assert bool((post.mean[:, ~free] == 0).all())
    active = free & ((post.mean <= -0.6) | (post.mean >= 0.7))
    assert bool(active.any())
    held = torch.where(active, post.mean, m * free)
    _, var = dense_conditioning(held, w * ~active, C)
    assert float((post.variance - var).abs().max()) <= 1e-10
    assert bool((post.variance[active] == 0).all())
    s = post.sample(4, generator=torch.Generator().manual_seed(1))
    assert bool((s[:, active] == post.mean[active]).all())  # the draws sit on the active bounds
    assert float((s.flatten(2) @ C.T).abs().max()) <= 1e-9


def test_layer_gaussian_head_with_bounds_and_gradients():
    class Head(torch.nn.Module):
        def forward(self, x):
            return x, 0.2 + x.square()

    model = cl.wrap(Head(), cl.DivergenceFree(), cl.Bounds(-1.0, 1.0))
    x = 1.5 * torch.randn(2, 2, 7, 6, dtype=F64, generator=torch.Generator().manual_seed(2))
    mean, var = model(x)
    assert float(mean.abs().max()) <= 1.0
    C = dense_div((2, 7, 6), [1 / 6, 1 / 5])
    ref, _, _ = bounded_reference(x, 0.2 + x.square(), C, -1.0, 1.0)
    assert float((mean.flatten(1) - ref).abs().max()) <= 1e-10
    _, v_ref = dense_conditioning(x, 0.2 + x.square(), C)
    assert float((var - v_ref).abs().max()) <= 1e-10
    # gradients through the bounded mean (the active set held for the perturbations)
    xs = x[:1].clone().requires_grad_()
    vs = (0.2 + x[:1].square()).clone().requires_grad_()
    b = cl.Bounds(-1.0, 1.0)
    f = lambda m, v: condition_local(m, v, cl.DivergenceFree(), b).mean  # noqa: E731
    assert torch.autograd.gradcheck(f, (xs, vs), eps=1e-7, fast_mode=True)


def test_float32_and_refusals():
    m, v = problem((8, 8), batch=1, seed=3)
    post = condition_local(m.float(), v.float(), cl.DivergenceFree(), cl.Bounds(-0.5, 0.5))
    assert post.mean.dtype == torch.float32 and float(post.mean.abs().max()) <= 0.5
    C = dense_div((2, 8, 8), [1 / 7, 1 / 7])
    assert float((post.mean.double().flatten(1) @ C.T).abs().max()) <= 1e-5 * 2 * 7 * 4
    with pytest.raises(ValueError, match="outside the bounds"):
        condition_local(m, v, cl.DivergenceFree(), cl.Dirichlet(1.0, dim=0), cl.Bounds(-0.5, 0.5))
    for extra in ((cl.Neumann(0.0, dim=0),), (cl.Conservation.integral(0.0, dim=(0, 1)),)):
        with pytest.raises(NotImplementedError, match="not yet"):
            condition_local(m, v, cl.DivergenceFree(), *extra, cl.Bounds(-0.5, 0.5))
