"""cl.LinearPDE and cl.Continuity: the operators as documented, and the projection equal to
dense float64 references (built here from torch.gradient and hand-written stencils)."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_projection

import constraint_layers as cl
from constraint_layers.functional import enforce_local
from constraint_layers.local.stencils import stencil_1d

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("n", [3, 4, 7, 10])
def test_first_derivative_is_torch_gradient(n):
    u = torch.randn(3, n, dtype=F64)
    op = stencil_1d(n, 0.37, 1, "gradient", False)
    ref = torch.gradient(u, spacing=0.37, dim=1, edge_order=2)[0]
    assert torch.allclose(op.apply(u, 1), ref, rtol=0, atol=1e-13)


def second_derivative_matrix(n, h, periodic):
    """The documented second-derivative stencils, written out."""
    D = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for o, w in ((-1, 1.0), (0, -2.0), (1, 1.0)):
            j = i + o
            if periodic:
                D[i, j % n] += w
            elif 0 <= j < n and 0 < i < n - 1:
                D[i, j] += w
    if not periodic:
        D[0, :4] = torch.tensor([2.0, -5.0, 4.0, -1.0])
        D[-1, -4:] = torch.tensor([-1.0, 4.0, -5.0, 2.0])
    return D / h**2


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("stencil", ["gradient", "spectral"])
@pytest.mark.parametrize("n", [6, 9])
def test_stencil_transpose_symbol_and_exactness(n, stencil, order, periodic):
    if stencil == "spectral" and not periodic:
        pytest.skip("spectral is periodic only")
    h = 0.3
    op = stencil_1d(n, h, order, stencil, periodic)
    D = op.dense()
    v = torch.randn(4, n, dtype=F64)
    assert torch.allclose(op.transpose(v, 1), v @ D, rtol=0, atol=1e-12)
    if order == 2 and stencil == "gradient":
        assert torch.allclose(D, second_derivative_matrix(n, h, periodic), rtol=0, atol=1e-12)
    if not periodic:  # second order: exact on quadratics
        x = torch.arange(n, dtype=F64) * h
        want = 2 * x if order == 1 else torch.full_like(x, 2.0)
        assert torch.allclose(D @ x**2, want, rtol=0, atol=1e-10)
        return
    for k in range(n):  # the Fourier symbol: D e_k = s(k) e_k
        e = torch.exp(2j * math.pi * k * torch.arange(n, dtype=F64) / n)
        s = op.symbol()[k]
        assert torch.allclose(D.to(torch.complex128) @ e, s * e, rtol=0, atol=1e-10)
    if stencil == "spectral":
        k = torch.fft.fftfreq(n, 1 / n, dtype=F64)
        want = 2 * math.pi * k / (n * h)
        if order == 1:
            want[k.abs() == n / 2] = 0.0
            assert torch.allclose(op.symbol().imag, want, atol=1e-12)
        else:
            assert torch.allclose(op.symbol().real, -want.square(), atol=1e-9)


def dense_operator(shape, terms, hs, periodic=False):
    """``sum a D u_c`` as a dense matrix from torch.gradient (first derivatives, walls) and the
    written-out second-derivative matrices."""
    n = math.prod(shape)
    eye = torch.eye(n, dtype=F64).reshape(n, *shape)
    out = 0
    for a, c, ax, order in terms:
        x = eye[:, c]
        if order == 1 and not periodic:
            g = torch.gradient(x, spacing=hs[ax], dim=ax + 1, edge_order=2)[0]
        elif order == 1:
            g = (torch.roll(x, -1, ax + 1) - torch.roll(x, 1, ax + 1)) / (2 * hs[ax])
        else:
            D = second_derivative_matrix(shape[ax + 1], hs[ax], periodic)
            g = torch.movedim(torch.movedim(x, ax + 1, -1) @ D.T, -1, ax + 1)
        out = out + a * g
    return out.reshape(n, -1).T


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [False, True])
def test_heat_equation_rows_equal_dense(periodic, dtype):
    # u_t - 0.1 u_xx = f on a (t, x) grid; not separable (one channel along two axes): CG
    g = torch.Generator().manual_seed(1)
    grid = (9, 11)
    terms = [(1.0, 0, 0, 1), (-0.1, 0, 1, 2)]
    con = cl.LinearPDE(terms, periodic=periodic)
    hs = [1 / n for n in grid] if periodic else [1 / (n - 1) for n in grid]
    C = dense_operator((1, *grid), terms, hs, periodic)
    assert torch.allclose(con.rows((1, 1, *grid)).dense(), C, rtol=0, atol=1e-9)
    v = torch.randn(2, math.prod(grid), dtype=F64, generator=g)
    f = (v @ C.T).reshape(2, *grid)  # a right-hand side in the range of C
    u = torch.randn(2, 1, *grid, dtype=F64, generator=g).to(dtype)
    out = enforce_local(u, cl.LinearPDE(terms, f, periodic=periodic))
    ref = dense_projection(u, C, f)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(ref.abs().max())
    rel = con.rows((1, 1, *grid)).operator.apply(out.to(F64)).sub(f).abs().max()
    assert float(rel) <= TOL[dtype] * (C.abs().sum(1).max() * ref.abs().max() + f.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_continuity_equal_dense(dtype):
    # rho_t + F_x = 0 on (t, x): walls in time, periodic in space
    g = torch.Generator().manual_seed(4)
    grid = (7, 10)
    con = cl.Continuity(density=0, flux=1, periodic=(False, True))
    u = torch.randn(3, 2, *grid, dtype=F64, generator=g).to(dtype)
    n = math.prod((2, *grid))
    eye = torch.eye(n, dtype=F64).reshape(n, 2, *grid)
    ht, hx = 1 / 6, 1 / 10
    dt = torch.gradient(eye[:, 0], spacing=ht, dim=1, edge_order=2)[0]
    dx = (torch.roll(eye[:, 1], -1, 2) - torch.roll(eye[:, 1], 1, 2)) / (2 * hx)
    C = (dt + dx).reshape(n, -1).T
    out = enforce_local(u, con)
    ref = dense_projection(u, C)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())


def test_terms_accept_term_objects_and_reject_bad_ones():
    a = cl.LinearPDE([cl.local.Term(1.0, 0, 0), cl.local.Term(1.0, 1, 1)])
    b = cl.DivergenceFree()
    u = torch.randn(2, 2, 8, 8, dtype=F64)
    assert torch.equal(enforce_local(u, a), enforce_local(u, b))
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        cl.LinearPDE([(1.0, 0, 0, 3)])
    with pytest.raises(TypeError, match=r"\(coefficient, channel, axis"):
        cl.LinearPDE([1.0])
    with pytest.raises(ValueError, match="non-zero coefficient"):
        cl.LinearPDE([(0.0, 0, 0)])
    with pytest.raises(cl.errors.GridError, match="channel 3 is out of range"):
        enforce_local(u, cl.LinearPDE([(1.0, 3, 0)]))
    # the same rows twice (several local constraints in one call): one projection
    assert float((enforce_local(u, a, b) - enforce_local(u, b)).abs().max()) <= 1e-12


def test_non_separable_operator_that_stalls_says_so():
    u = torch.randn(1, 1, 33, 33, dtype=F64, generator=torch.Generator().manual_seed(0))
    heat = cl.LinearPDE([(1.0, 0, 0, 1), (-0.1, 0, 1, 2)])
    with pytest.raises(cl.errors.SingularConstraintError, match="not separable"):
        enforce_local(u, heat)


def test_heat_operator_limit_is_its_conditioning():
    """The documented cause of the stall: C (u_t - 0.1 u_xx, gradient stencil) is square with
    rank N - 4 and a condition number that grows fast with the grid (C C^T squares it)."""
    heat = cl.LinearPDE([(1.0, 0, 0, 1), (-0.1, 0, 1, 2)])
    conds = []
    for n in (9, 17):
        C = heat.rows((1, 1, n, n)).dense()
        sv = torch.linalg.svdvals(C)
        nz = sv[sv > 1e-10 * sv[0]]
        assert nz.numel() == n * n - 4
        conds.append(float(nz[0] / nz[-1]))
    assert 5e3 < conds[0] < 5e4 and 5e5 < conds[1] < 5e6  # 1.0e4, 1.6e6 (documented)
    # converges where cond(C)^2 is within float64's reach (judged, as the solver stops, at the
    # input's scale: the output of a nearly square C is far smaller than its input)
    u = torch.randn(1, 1, 17, 17, dtype=F64, generator=torch.Generator().manual_seed(1))
    y = enforce_local(u, heat)
    rows = heat.rows(y.shape)
    scale = rows.operator.row_scale() * float(u.abs().max())
    assert float(rows.residual(y).abs().max()) <= 1e-10 * scale
