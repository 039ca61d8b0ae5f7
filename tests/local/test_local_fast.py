"""The fast local solves: the DCT by FFT, the capacitance (exact) solve next to walls, and CG
iterations that do not grow with the grid (17^2 to 129^2)."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div, dense_projection

import constraint_layers as cl
from constraint_layers.functional import enforce_local
from constraint_layers.local import fastsolve, solve
from constraint_layers.local.transforms import dct, dct_eigenvalues, dct_matrix, idct

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def no_slip(d=2):
    return tuple(cl.Dirichlet(0.0, dim=j) for j in range(d))


@pytest.fixture
def force_dct(monkeypatch):
    """The DCT on every axis (small grids too), caches cleared before and after."""

    def clear():
        solve.fast_solve.cache_clear()
        solve._capacitance.cache_clear()

    clear()
    monkeypatch.setattr(fastsolve, "DCT_MIN_NODES", 5)
    yield
    clear()


@pytest.fixture
def count_cg(monkeypatch):
    """The CG iterations of every local solve, in order."""
    its: list[int] = []
    orig = solve.pcg

    def counting(*a, **k):
        out = orig(*a, **k)
        its.append(out[2])
        return out

    monkeypatch.setattr(solve, "pcg", counting)
    return its


@pytest.mark.parametrize("n", [5, 8, 17, 64])
def test_dct_matches_its_definition_and_inverts(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 2, n, dtype=F64, generator=g)
    k = torch.arange(n, dtype=F64).unsqueeze(1)
    j = torch.arange(n, dtype=F64).unsqueeze(0)
    t = torch.cos(math.pi * k * (2 * j + 1) / (2 * n)) * math.sqrt(2.0 / n)
    t[0] /= math.sqrt(2.0)
    assert float((dct(x) - x @ t.T).abs().max()) <= 1e-13
    assert float((idct(dct(x)) - x).abs().max()) <= 1e-13
    assert float((dct_matrix(n) @ dct_matrix(n).T - torch.eye(n, dtype=F64)).abs().max()) < 1e-13


def test_dct_diagonalises_a_symmetric_stencil_with_even_ends():
    n = 11
    stencil = torch.tensor([-1.0, 0.5, 3.0, 0.5, -1.0], dtype=F64)
    # the matrix of the stencil on the half-sample even extension x_{-1-j} = x_j
    a = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for o, w in zip(range(-2, 3), stencil):
            j = i + o
            j = -1 - j if j < 0 else (2 * n - 1 - j if j >= n else j)
            a[i, j] += w
    t = dct_matrix(n)
    assert float((t @ a @ t.T - torch.diag(dct_eigenvalues(stencil, n))).abs().max()) < 1e-12


@pytest.mark.parametrize(("dtype", "walls"), [(torch.float64, False), (torch.float32, True)])
def test_dct_and_capacitance_equal_dense_reference(force_dct, count_cg, dtype, walls):
    grid = (33, 34)  # the DCT needs DCT_END_ROWS rows clear of each end, the capacitance set B
    # (four lines along each wall) fewer than half the nodes
    g = torch.Generator().manual_seed(sum(grid) + walls)
    u = torch.randn(2, 2, *grid, dtype=F64, generator=g).to(dtype)
    bcs = no_slip() if walls else ()
    out = enforce_local(u, cl.DivergenceFree(), *bcs)
    C = dense_div((2, *grid), [1 / (n - 1) for n in grid])
    free = None
    if walls:
        free = torch.ones(2, *grid, dtype=torch.bool)
        free[:, 0], free[:, -1], free[:, :, 0], free[:, :, -1] = False, False, False, False
    ref = dense_projection(torch.where(free, u.to(F64), 0.0) if walls else u, C, free=free)
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    assert max(count_cg) <= 2  # the capacitance solve is exact: one step (a polish)
    assert solve.fast_solve(*_key(grid)).approximate


def _key(grid):
    op = cl.DivergenceFree().operator((1, 2, *grid))
    return (solve.op_key(op), None)


@pytest.mark.parametrize("walls", [False, True])
def test_no_slip_gradcheck_with_the_capacitance_solve(force_dct, walls):
    g = torch.Generator().manual_seed(4)
    u = torch.randn(1, 2, 7, 8, dtype=F64, generator=g, requires_grad=True)
    bcs = no_slip() if walls else ()
    assert torch.autograd.gradcheck(lambda u: enforce_local(u, cl.DivergenceFree(), *bcs), (u,))


@pytest.mark.parametrize("walls", [False, True])
def test_cg_iterations_bounded_in_n(count_cg, walls):
    """Walls and no-slip, 17^2 to 129^2 (dense eigenvectors below DCT_MIN_NODES, the DCT
    above): the capacitance solve makes CG stop after one or two iterations at every size."""
    bcs = no_slip() if walls else ()
    for n in (17, 33, 65, 129):
        count_cg.clear()
        u = torch.randn(1, 2, n, n, dtype=F64, requires_grad=True)
        out = enforce_local(u, cl.DivergenceFree(), *bcs)
        out.square().sum().backward()
        rows = cl.DivergenceFree().rows(out.shape)
        assert float(rows.relative_residual(out.detach()).max()) <= 1e-10
        assert len(count_cg) == 2 and max(count_cg) <= 2, (n, count_cg)


LAYOUTS = {
    # (the border must be under half the nodes: 6^3 grids fall back to CG, 12^3 do not)
    "3d_no_slip": ((1, 3, 12, 13, 12), [cl.Dirichlet(0.0, dim=j) for j in range(3)]),
    "cavity": ((1, 2, 10, 9), [
        cl.Dirichlet(0.0, dim=0),
        cl.Dirichlet(0.0, dim=1, side="low"),
        cl.Dirichlet(1.0, dim=1, side="high", channels=0),
        cl.Dirichlet(0.0, dim=1, side="high", channels=1),
    ]),
    "plug": ((1, 2, 9, 8), [cl.Dirichlet(1.0, dim=0, channels=0),
                            cl.Dirichlet(0.0, dim=1, channels=1)]),
}  # fmt: skip


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_capacitance_serves_every_wall_layout(count_cg, layout):
    shape, walls = LAYOUTS[layout]
    d = len(shape) - 2
    con = cl.DivergenceFree(tuple(range(d)))
    u = torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    out = enforce_local(u, con, *walls)
    assert max(count_cg) <= 2, count_cg
    rows = con.rows(out.shape)
    scale = rows.operator.row_scale() * float(out.abs().max())
    assert float(rows.residual(out).abs().max()) <= 1e-10 * scale
