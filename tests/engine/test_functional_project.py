"""``cl.functional.project``: the joint entry, the layer's path as a pure function. It equals the
layer's output for every family and for mixes, in float32 and float64; a deterministic output
comes back as a tensor, a Gaussian one as the library's Gaussian record."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers import metrics

F64 = torch.float64
project = cl.functional.project


class Head(nn.Module):
    """Returns (mean, variance): a Gaussian output."""

    def __init__(self, var: torch.Tensor) -> None:
        super().__init__()
        self.var = var

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, self.var


def _u(shape, dtype, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(dtype)


MIXES = {
    "dirichlet": lambda: [cl.Dirichlet(0.5)],
    "neumann": lambda: [cl.Neumann(0.0)],
    "periodic": lambda: [cl.Periodic()],
    "total": lambda: [cl.Conservation.integral(0.7)],
    "matrix": lambda: [cl.Conservation(torch.ones(1, 33, dtype=F64), 2.0)],
    "bounds": lambda: [cl.Bounds(lower=-0.5, upper=0.5)],
    "walls+total": lambda: [cl.Neumann(0.0), cl.Conservation.integral(0.2)],
    "walls+total+bounds": lambda: [
        cl.Dirichlet(0.0),
        cl.Conservation.integral(0.1),
        cl.Bounds(lower=-0.2),
    ],
}


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", sorted(MIXES))
def test_equals_the_layer_deterministic(name, dtype):
    cons = MIXES[name]()
    u = _u((4, 1, 33), dtype)
    got = project(u, *cons, extent=2.0)
    ref = cl.wrap(nn.Identity(), *cons, extent=2.0)(u)
    assert isinstance(got, torch.Tensor) and got.dtype == dtype and got.shape == u.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert not torch.equal(got, u)  # not vacuous: the output moved
    assert torch.equal(project(u, cons, extent=2.0), got)  # one sequence works too


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_equals_the_layer_on_a_2d_box_with_walls_total_and_bounds(dtype):
    total = cl.Conservation.integral(0.05, dim=(0, 1))
    cons = [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.1, dim=1), total, cl.Bounds(lower=-0.3)]
    u = 0.2 * _u((2, 1, 12, 10), dtype, seed=1)
    got = project(u, *cons)
    torch.testing.assert_close(got, cl.wrap(nn.Identity(), *cons)(u), rtol=0, atol=0)
    assert bool(got.min() >= torch.tensor(-0.3, dtype=dtype))  # the bound in the output dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    assert float(metrics.conservation_error(got.double(), cons[2]).abs().max()) < tol


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_equals_the_layer_with_local_rows(dtype):
    cons = [cl.DivergenceFree(periodic=True)]
    u = _u((2, 2, 16, 16), dtype, seed=2)
    got = project(u, *cons)
    torch.testing.assert_close(got, cl.wrap(nn.Identity(), *cons)(u), rtol=0, atol=0)
    rows = cons[0].rows(tuple(u.shape))
    assert float(rows.relative_residual(got).max()) < (1e-10 if dtype == F64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_equals_the_layer_with_local_rows_and_walls(dtype):
    cons = [cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1)]
    u = _u((2, 2, 12, 12), dtype, seed=3)
    torch.testing.assert_close(project(u, *cons), cl.wrap(nn.Identity(), *cons)(u), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", ["total", "walls+total", "walls+total+bounds", "matrix"])
def test_gaussian_output_returns_the_gaussian_record(name, dtype):
    cons = MIXES[name]()
    u = _u((3, 1, 33), dtype, seed=4)
    var = (0.1 + _u((3, 1, 33), F64, seed=5).abs()).to(dtype)
    got = project(u, *cons, variance=var, extent=2.0)
    assert isinstance(got, cl.functional.Gaussian)
    mean, v = cl.wrap(Head(var), *cons, extent=2.0)(u)
    torch.testing.assert_close(got.mean, mean, rtol=0, atol=0)
    torch.testing.assert_close(got.variance, v, rtol=0, atol=0)
    assert got.mean.dtype == dtype


def test_euclidean_metric_and_noise_as_for_wrap():
    u, var = _u((2, 1, 17), F64), torch.full((2, 1, 17), 0.3, dtype=F64)
    total = cl.Conservation.integral(1.0)
    for opts in ({"metric": "euclidean"}, {"noise": 0.1}):
        got = project(u, total, variance=var, **opts)
        mean, v = cl.wrap(Head(var), total, **opts)(u)
        torch.testing.assert_close(got.mean, mean, rtol=0, atol=0)
        torch.testing.assert_close(got.variance, v, rtol=0, atol=0)


def test_the_grid_at_once():
    from constraint_layers.rows import GridSpec

    u = _u((2, 1, 17), F64)
    cons = [cl.Neumann(0.0), cl.Conservation.integral(0.4)]
    wrapped = cl.wrap(nn.Identity(), *cons, extent=3.0)
    got = project(u, *cons, grid=wrapped.grid)
    torch.testing.assert_close(got, wrapped(u), rtol=0, atol=0)
    torch.testing.assert_close(got, project(u, *cons, extent=3.0), rtol=0, atol=0)
    with pytest.raises(ValueError, match="not both"):
        project(u, *cons, grid=GridSpec(extent=3.0), extent=3.0)
    with pytest.raises(TypeError, match="GridSpec"):
        project(u, *cons, grid=(None, 3.0, True))


def test_point_clouds():
    u = _u((2, 7, 2), F64, seed=6)
    cons = [cl.Dirichlet(1.0, points=torch.tensor([0, 3]))]
    got = project(u, *cons)
    torch.testing.assert_close(got, cl.wrap(nn.Identity(), *cons)(u), rtol=0, atol=0)
    assert bool((got[:, [0, 3]] == 1.0).all())


def test_given_values_and_inputs():
    u = _u((2, 1, 9), F64)
    total = cl.Conservation.integral(cl.Given("mass"))
    mass = torch.tensor([[0.5], [1.5]], dtype=F64)
    got = project(u, total, mass=mass)
    ref = cl.wrap(nn.Identity(), total)(u, mass=mass)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    wall = cl.Dirichlet(lambda x: x[:, :, 0])  # a value computed from the model input
    x = _u((2, 1, 9), F64, seed=1)
    out = project(u, wall, inputs=x)
    assert torch.equal(out[..., 0], x[..., 0]) and torch.equal(out[..., -1], x[..., 0])


def test_the_caller_tensors_are_not_modified():
    u = _u((2, 1, 9), F64)
    var = torch.ones_like(u)
    keep_u, keep_var = u.clone(), var.clone()
    project(u, cl.Neumann(0.0), cl.Conservation.integral(1.0), variance=var)
    assert torch.equal(u, keep_u) and torch.equal(var, keep_var)


def test_gradcheck():
    u = _u((2, 1, 9), F64).requires_grad_()
    cons = [cl.Neumann(0.0), cl.Conservation.integral(0.3)]
    assert torch.autograd.gradcheck(lambda x: project(x, *cons), (u,))


def test_debug_checks_the_rows():
    u = _u((2, 1, 9), F64)
    out = project(u, cl.Dirichlet(0.0), cl.Conservation.integral(0.3), debug=True)
    assert torch.equal(out[..., 0], torch.zeros(2, 1, dtype=F64))


def test_bad_input_names_the_call():
    u = _u((2, 1, 9), F64)
    with pytest.raises(TypeError, match=r"^project: u must be a tensor"):
        project(u.tolist(), cl.Dirichlet(0.0))
    with pytest.raises(ValueError, match=r"^project: expected at least one constraint"):
        project(u)
    with pytest.raises(TypeError, match=r"^project: expected constraints"):
        project(u, "dirichlet")
    with pytest.raises(TypeError, match=r"^project: unexpected keyword argument\(s\) \['mas'\]"):
        project(u, cl.Conservation.integral(cl.Given("mass")), mass=1.0, mas=1.0)
    with pytest.raises(ValueError, match=r"^project: metric must be one of"):
        project(u, cl.Conservation.integral(0.0), metric="l2")
    with pytest.raises(ValueError, match=r"^project: variance of shape \(3,\) does not broadcast"):
        project(u, cl.Conservation.integral(0.0), variance=torch.ones(3, dtype=F64))
