"""cl.DivergenceFree: exact to rounding and equal to independent float64 references (dense
pseudo-inverse projections built from torch.gradient / torch.roll, and a torch.fft projection)."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div, dense_projection, fft_divfree

import constraint_layers as cl
from constraint_layers.errors import GridError, IncompatibleConstraintsError
from constraint_layers.functional import enforce_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_residual(C, out, f=None):
    """max |C u - f| / (||C||_inf max|u| + max|f|) over samples (float64)."""
    x = out.to(F64).flatten(1)
    r = x @ C.T - (0 if f is None else f.to(F64).flatten(1))
    size = C.abs().sum(1).max() * x.abs().max() + (0 if f is None else f.abs().max())
    return float(r.abs().max() / size)


def walls_h(grid):
    return [1 / (n - 1) for n in grid]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [(8, 8), (12, 10), (6, 6, 6)])
def test_walls_equal_dense_reference(grid, dtype):
    g = torch.Generator().manual_seed(sum(grid))
    d = len(grid)
    u = torch.randn(3, d, *grid, dtype=F64, generator=g).to(dtype)
    C = dense_div((d, *grid), walls_h(grid))
    out = enforce_local(u, cl.DivergenceFree(tuple(range(d))))
    assert out.dtype == dtype and out.shape == u.shape
    ref = dense_projection(u, C)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    assert rel_residual(C, out) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [(8, 8), (9, 7), (6, 6, 6)])
def test_periodic_equal_dense_and_fft_references(grid, dtype):
    g = torch.Generator().manual_seed(7 + sum(grid))
    d = len(grid)
    u = torch.randn(2, d, *grid, dtype=F64, generator=g).to(dtype)
    hs = [1 / n for n in grid]  # periodic: no repeated end node
    C = dense_div((d, *grid), hs, periodic=True)
    out = enforce_local(u, cl.DivergenceFree(tuple(range(d)), periodic=True))
    scale = float(u.abs().max())
    assert float((out.to(F64) - dense_projection(u, C)).abs().max()) <= TOL[dtype] * scale
    assert float((out.to(F64) - fft_divfree(u, hs)).abs().max()) <= TOL[dtype] * scale
    assert rel_residual(C, out) <= TOL[dtype]


def dense_spectral_div(shape, lengths):
    """Spectral divergence, dense: i 2 pi k / L on each axis (Nyquist zeroed), by torch.fft."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *shape)
    out = 0
    for j, L in enumerate(lengths):
        m = shape[j + 1]
        k = torch.fft.fftfreq(m, 1 / m, dtype=F64)
        if m % 2 == 0:
            k[m // 2] = 0.0
        view = [1] * len(lengths)
        view[j] = m
        sym = (2j * math.pi * k / L).reshape(view)
        x = eye[:, j]
        out = out + torch.fft.ifft(torch.fft.fft(x, dim=j + 1) * sym, dim=j + 1).real
    return out.reshape(n, -1).T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [(8, 8), (9, 6)])
def test_spectral_equal_dense_reference(grid, dtype):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g).to(dtype)
    C = dense_spectral_div((2, *grid), (2 * math.pi, 2 * math.pi))
    con = cl.DivergenceFree(periodic=True, stencil="spectral")
    out = enforce_local(u, con, extent=2 * math.pi)
    assert float((out.to(F64) - dense_projection(u, C)).abs().max()) <= TOL[dtype] * float(
        u.abs().max()
    )
    assert rel_residual(C, out) <= TOL[dtype]


def test_anisotropic_extent_and_source_values():
    g = torch.Generator().manual_seed(11)
    grid = (9, 12)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g)
    hs = [2.0 / 8, 0.5 / 11]
    C = dense_div((2, *grid), hs)
    v = torch.randn(2, 2 * math.prod(grid), dtype=F64, generator=g)
    f = (v @ C.T).reshape(2, *grid)  # a source some field has
    out = enforce_local(u, cl.DivergenceFree(value=f), extent=(2.0, 0.5))
    assert float((out - dense_projection(u, C, f)).abs().max()) <= 1e-10 * float(u.abs().max())
    assert rel_residual(C, out, f) <= 1e-10
    # a number and a callable of the input give the same as the tensor
    one = enforce_local(u, cl.DivergenceFree(value=1.5), extent=(2.0, 0.5))
    call = enforce_local(u, cl.DivergenceFree(value=lambda x: x), extent=(2.0, 0.5), inputs=1.5)
    assert torch.equal(one, call)
    assert rel_residual(C, one, torch.full((2, *grid), 1.5, dtype=F64)) <= 1e-10


def test_input_not_modified():
    u = torch.randn(2, 2, 8, 8, dtype=F64)
    before = u.clone()
    enforce_local(u, cl.DivergenceFree())
    enforce_local(u, cl.DivergenceFree(periodic=True))
    enforce_local(u, cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    assert torch.equal(u, before)


def no_slip():
    return (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))


def interior_mask(shape):
    m = torch.zeros(shape, dtype=torch.bool)
    m[(slice(None), *[slice(1, -1)] * (len(shape) - 1))] = True
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grid", [(8, 8), (12, 10), (6, 7, 6)])
def test_no_slip_equal_dense_reference(grid, dtype):
    g = torch.Generator().manual_seed(5)
    d = len(grid)
    u = torch.randn(2, d, *grid, dtype=F64, generator=g).to(dtype)
    walls_bc = [cl.Dirichlet(0.0, dim=j) for j in range(d)]
    out = enforce_local(u, cl.DivergenceFree(tuple(range(d))), *walls_bc)
    free = interior_mask((d, *grid))
    assert bool((out[:, ~free] == 0).all())  # to the bit
    C = dense_div((d, *grid), walls_h(grid))
    z = u.to(F64) * free
    ref = dense_projection(z, C, free=free)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    assert rel_residual(C, out) <= TOL[dtype]


def test_lid_driven_cavity_walls():
    g = torch.Generator().manual_seed(9)
    grid = (10, 9)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g)
    walls = [
        cl.Dirichlet(0.0, dim=0),
        cl.Dirichlet(0.0, dim=1, side="low"),
        cl.Dirichlet(1.0, dim=1, side="high", channels=0),  # the lid
        cl.Dirichlet(0.0, dim=1, side="high", channels=1),
    ]
    out = enforce_local(u, cl.DivergenceFree(), *walls)
    z = cl.functional.enforce_boundary(u, walls)
    C = dense_div((2, *grid), walls_h(grid))
    ref = dense_projection(z, C, free=interior_mask((2, *grid)))
    assert torch.equal(out[:, 0, 1:-1, -1], torch.ones(2, 8, dtype=F64))
    assert float((out - ref).abs().max()) <= 1e-10
    assert rel_residual(C, out) <= 1e-10


def test_plug_flow_through_walls_is_compatible():
    grid = (9, 8)
    u = torch.randn(1, 2, *grid, dtype=F64)
    walls = [cl.Dirichlet(1.0, dim=0, channels=0), cl.Dirichlet(0.0, dim=1, channels=1)]
    out = enforce_local(u, cl.DivergenceFree(), *walls)
    C = dense_div((2, *grid), walls_h(grid))
    assert rel_residual(C, out) <= 1e-10


def test_net_inflow_raises_naming_the_net_flux():
    u = torch.randn(1, 2, 10, 9, dtype=F64)
    walls = [
        cl.Dirichlet(0.0, dim=1),
        cl.Dirichlet(0.0, dim=0, side="high"),
        cl.Dirichlet(1.0, dim=0, side="low", channels=0),  # inflow, no outflow
        cl.Dirichlet(0.0, dim=0, side="low", channels=1),
    ]
    with pytest.raises(IncompatibleConstraintsError, match=r"net flux .* is 1\.0000"):
        enforce_local(u, cl.DivergenceFree(), *walls)


def test_source_out_of_range_raises_with_walls():
    u = torch.randn(1, 2, 8, 9, dtype=F64)
    f = torch.randn(1, 8, 9, dtype=F64)  # not a divergence under the one-sided stencils
    with pytest.raises(IncompatibleConstraintsError, match="net flux"):
        enforce_local(u, cl.DivergenceFree(value=f))


def test_periodic_source_with_nonzero_mean_raises():
    u = torch.randn(1, 2, 8, 8, dtype=F64)
    with pytest.raises(IncompatibleConstraintsError, match="net flux"):
        enforce_local(u, cl.DivergenceFree(periodic=True, value=1.0))


@pytest.mark.parametrize("case", ["walls", "periodic", "no_slip"])
def test_gradcheck(case):
    g = torch.Generator().manual_seed(2)
    grid = (5, 6)
    u = torch.randn(1, 2, *grid, dtype=F64, generator=g, requires_grad=True)
    per = case == "periodic"
    hs = [1 / n for n in grid] if per else walls_h(grid)
    C = dense_div((2, *grid), hs, periodic=per)
    # the source as the divergence of a field (in the range of C, whatever the perturbation)
    v = 0.1 * torch.randn(1, 2, *grid, dtype=F64, generator=g) * interior_mask((2, *grid))
    v.requires_grad_()
    args = no_slip() if case == "no_slip" else ()

    def fn(u, v):
        f = (v.flatten(1) * interior_mask((2, *grid)).flatten()) @ C.T
        return enforce_local(u, cl.DivergenceFree(periodic=per, value=f.reshape(1, *grid)), *args)

    assert torch.autograd.gradcheck(fn, (u, v))


def test_backward_is_one_solve_not_through_iterations():
    u = torch.randn(1, 2, 9, 9, dtype=F64, requires_grad=True)
    out = enforce_local(u, cl.DivergenceFree(), *no_slip())
    nodes, stack = [], [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None:
            continue
        nodes.append(type(fn).__name__)
        stack += [n for n, _ in fn.next_functions]
    assert "_ProjectBackward" in nodes  # the custom node with the implicit (adjoint) solve
    assert len(nodes) < 20  # no node per CG iteration (it takes about 11 here)


def test_bad_input_messages():
    u = torch.randn(1, 2, 8, 8)
    with pytest.raises(GridError, match="2 component"):
        enforce_local(torch.randn(1, 3, 6, 6, 6), cl.DivergenceFree())
    with pytest.raises(GridError, match="needs at least 3"):
        enforce_local(torch.randn(1, 2, 2, 8), cl.DivergenceFree())
    with pytest.raises(ValueError, match="periodic=True"):
        cl.DivergenceFree(stencil="spectral")
    with pytest.raises(ValueError, match="stencil must be one of"):
        cl.DivergenceFree(stencil="upwind")
    with pytest.raises(NotImplementedError, match="bounds with local rows combine"):
        enforce_local(u, cl.DivergenceFree(), cl.Neumann(0.0, dim=0), cl.Bounds(lower=-5.0))
    with pytest.raises(NotImplementedError, match="combines with boundary conditions"):
        enforce_local(u, cl.DivergenceFree(), object.__new__(type("X", (), {"family": "x"})))
    with pytest.raises(GridError, match="broadcastable"):
        enforce_local(u, cl.DivergenceFree(value=torch.zeros(3, 5)))
    with pytest.raises(ValueError, match="finite"):
        cl.DivergenceFree(value=float("nan"))
