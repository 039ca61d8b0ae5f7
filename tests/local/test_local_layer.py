"""cl.wrap with local constraints: output mode on a 2D FNO, a training step, no-slip walls,
cl.Given values, Gaussian heads and debug mode."""

from __future__ import annotations

import pytest
import torch
from _local_refs import dense_conditioning, dense_div, dense_projection
from _models import fno

import constraint_layers as cl

F64 = torch.float64


def div_rel(u, periodic=False):
    grid = u.shape[2:]
    hs = [1 / n for n in grid] if periodic else [1 / (n - 1) for n in grid]
    C = dense_div((2, *grid), hs, periodic=periodic)
    x = u.detach().to(F64).flatten(1)
    return float((x @ C.T).abs().max() / (C.abs().sum(1).max() * x.abs().max()))


@pytest.mark.parametrize("periodic", [True, False])
def test_fno_output_mode_and_training_step(periodic):
    pytest.importorskip("neuralop")
    torch.manual_seed(0)
    net = fno((6, 6), in_channels=1, out_channels=2)
    model = cl.wrap(net, cl.DivergenceFree(periodic=periodic))
    assert isinstance(model, cl.ConstraintLayer) and cl.unwrap(model) is net
    assert set(model.state_dict()) == {f"model.{k}" for k in net.state_dict()} - {"model._metadata"}
    x = torch.randn(3, 1, 16, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    y = model(x)
    assert y.shape == (3, 2, 16, 16) and y.dtype == torch.float32
    assert div_rel(y, periodic) <= 1e-5
    loss = (y - torch.ones_like(y)).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    opt.step()
    assert div_rel(model(x), periodic) <= 1e-5


def test_fno_no_slip_training_step_equals_dense():
    pytest.importorskip("neuralop")
    torch.manual_seed(1)
    net = fno((5, 5), in_channels=1, out_channels=2, dtype=F64)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    model = cl.wrap(net, cl.DivergenceFree(), *walls)
    x = torch.randn(2, 1, 12, 10, dtype=F64)
    y = model(x)
    raw = net(x).detach()
    free = torch.zeros(2, 12, 10, dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    C = dense_div((2, 12, 10), [1 / 11, 1 / 9])
    ref = dense_projection(raw * free, C, free=free)
    assert float((y.detach() - ref).abs().max()) <= 1e-10 * float(raw.abs().max())
    assert bool((y[:, ~free] == 0).all())
    res = model.residual(y.detach())  # the wall rows, then one row per node
    assert res.shape == (2, 2 * (2 * 10 + 2 * 12) + 12 * 10)
    assert float(res.abs().max()) <= 1e-10 * float(raw.abs().max()) * 22
    y.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_given_source_and_debug_mode():
    model = cl.wrap(
        torch.nn.Identity(), cl.DivergenceFree(periodic=True, value=cl.Given("src")), debug=True
    )
    u = torch.randn(2, 2, 8, 8, dtype=F64)
    C = dense_div((2, 8, 8), [1 / 8, 1 / 8], periodic=True)
    # a divergence (zero mean and zero at the Nyquist modes, where the central rows vanish)
    src = (torch.randn(2, 128, dtype=F64) @ C.T).reshape(2, 8, 8)
    y = model(u, src=src)
    res = cl.DivergenceFree(periodic=True, value=src).residual(y)
    assert float(res.abs().max()) <= 1e-10 * float(y.abs().max()) * 16
    with pytest.raises(ValueError, match="src"):
        model(u)


class GaussianHead(torch.nn.Module):
    def forward(self, x):
        return x, 0.2 + x.square()


def test_gaussian_head_conditioned_as_dense():
    model = cl.wrap(GaussianHead(), cl.DivergenceFree())
    x = torch.randn(2, 2, 9, 8, dtype=F64)
    mean, var = model(x)
    C = dense_div((2, 9, 8), [1 / 8, 1 / 7])
    m_ref, v_ref = dense_conditioning(x, 0.2 + x.square(), C)
    assert float((mean - m_ref).abs().max()) <= 1e-10
    assert float((var - v_ref).abs().max()) <= 1e-10
    eu = cl.wrap(GaussianHead(), cl.DivergenceFree(), metric="euclidean")
    mean_e, var_e = eu(x)
    assert torch.equal(var_e, 0.2 + x.square())
    assert float((mean_e - dense_projection(x, C)).abs().max()) <= 1e-10


def test_gaussian_head_with_no_slip_walls():
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    model = cl.wrap(GaussianHead(), cl.DivergenceFree(), *walls)
    x = torch.randn(2, 2, 9, 8, dtype=F64)
    mean, var = model(x)
    free = torch.zeros(2, 9, 8, dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    assert bool((mean[:, ~free] == 0).all()) and bool((var[:, ~free] == 0).all())
    C = dense_div((2, 9, 8), [1 / 8, 1 / 7]) * free.flatten()
    m_ref, v_ref = dense_conditioning(x * free, (0.2 + x.square()) * free, C)
    assert float((mean - m_ref).abs().max()) <= 1e-10
    assert float((var - v_ref).abs().max()) <= 1e-10


def test_unsupported_combinations_raise_clearly():
    u = torch.randn(1, 2, 8, 8)
    # (bounds, and Neumann walls, on a Gaussian head are supported: test_local_gaussian_bounds.py,
    # test_local_covariance.py; together they are not yet)
    both = (cl.Neumann(0.0, dim=0), cl.Bounds(lower=-5.0))
    head = cl.wrap(GaussianHead(), cl.DivergenceFree(), *both)
    with pytest.raises(NotImplementedError, match="not yet"):
        head(u.double())
    noisy = cl.wrap(GaussianHead(), cl.DivergenceFree(), noise=0.1)
    with pytest.raises(NotImplementedError, match="noise"):
        noisy(u.double())
    lifted = cl.wrap(GaussianHead(), cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0), lift=2)
    with pytest.raises(NotImplementedError, match="lift"):
        lifted(u.double())


def test_new_resolution_stays_exact_and_double_backward_refuses():
    model = cl.wrap(torch.nn.Identity(), cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0))
    for n in (12, 20, 33):
        u = torch.randn(2, 2, n, n + 1, dtype=F64)
        y = model(u)
        assert div_rel(y) <= 1e-10
    u = torch.randn(1, 2, 8, 8, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(model(u).square().sum(), u, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward"):
        g.sum().backward()
