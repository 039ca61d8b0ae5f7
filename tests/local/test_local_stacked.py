"""Several local constraints in one call: the projection onto all their rows at once, equal to a
dense float64 reference (the rows stacked), periodic and with walls, with totals; gradcheck."""

from __future__ import annotations

import pytest
import torch
from _local_refs import dense_projection

import constraint_layers as cl
from constraint_layers.errors import IncompatibleConstraintsError
from constraint_layers.functional import enforce_local

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def stacked(cons, shape):
    return torch.cat([c.rows(shape).dense() for c in cons])


def check(out, u, C, free=None, dtype=F64):
    ref = dense_projection(torch.where(free, u.to(F64), 0.0) if free is not None else u, C,
                           free=free)  # fmt: skip
    assert out.dtype == u.dtype and out.shape == u.shape
    assert float((out.to(F64) - ref).abs().max()) <= TOL[dtype] * float(u.abs().max())
    x = out.to(F64).flatten(1)
    scale = float(C.abs().sum(1).max()) * float(x.abs().max())
    assert float((x @ C.T).abs().max()) <= TOL[dtype] * scale


CASES = {
    # disjoint channels: a div-free velocity (0, 1) and a continuity law on (2, 3)
    "disjoint": lambda p: (cl.DivergenceFree((0, 1), periodic=p),
                           cl.LinearPDE([(1.0, 2, 0), (1.0, 3, 1)], periodic=p)),
    # overlapping: div-free (0, 1) and a second law reading channel 0 and 2
    "overlap": lambda p: (cl.DivergenceFree((0, 1), periodic=p),
                          cl.LinearPDE([(1.0, 0, 1), (-2.0, 2, 0)], periodic=p)),
    # the same constraint twice: dependent, agreeing rows
    "twice": lambda p: (cl.DivergenceFree(periodic=p), cl.DivergenceFree(periodic=p)),
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_equal_dense_reference(case, periodic, dtype):
    g = torch.Generator().manual_seed(len(case) + periodic)
    shape = (2, 4, 8, 9)
    u = torch.randn(*shape, dtype=F64, generator=g).to(dtype)
    cons = CASES[case](periodic)
    out = enforce_local(u, *cons)
    check(out, u, stacked(cons, shape), dtype=dtype)


@pytest.mark.parametrize("case", sorted(CASES))
def test_stacked_with_dirichlet_walls_and_a_total(case):
    g = torch.Generator().manual_seed(3)
    shape = (2, 4, 9, 8)
    u = torch.randn(*shape, dtype=F64, generator=g)
    cons = CASES[case](False)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    out = enforce_local(u, *cons, *walls)
    free = torch.ones(shape[1:], dtype=torch.bool)
    free[:, 0], free[:, -1], free[:, :, 0], free[:, :, -1] = False, False, False, False
    check(out, u, stacked(cons, shape), free=free)
    assert bool((out[:, ~free] == 0).all())
    # a total on channel 3 (not fixed by the rows): the dense reference stacks it too
    total = cl.Conservation.integral(0.25, dim=(0, 1), channels=3)
    out = enforce_local(u, *cons, *walls, total)
    G = total.rows(shape).dense(4 * 9 * 8)
    C = torch.cat([stacked(cons, shape), G])
    b = torch.zeros(2, C.shape[0], dtype=F64)
    b[:, -1] = 0.25
    ref = dense_projection(torch.where(free, u, 0.0), C, f=b, free=free)
    assert float((out - ref).abs().max()) <= 1e-10 * float(u.abs().max())


def test_stacked_gradcheck():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(1, 3, 5, 6, dtype=F64, generator=g, requires_grad=True)
    cons = CASES["overlap"](False)
    walls = (cl.Dirichlet(0.0, dim=0),)
    assert torch.autograd.gradcheck(lambda u: enforce_local(u, *cons, *walls), (u,))
    per = CASES["overlap"](True)
    assert torch.autograd.gradcheck(lambda u: enforce_local(u, *per), (u,))


def test_stacked_conflicting_constraints_raise():
    u = torch.randn(1, 2, 8, 8, dtype=F64)
    for p in (True, False):
        a = cl.DivergenceFree(periodic=p)
        f = a.residual(torch.randn(1, 2, 8, 8, dtype=F64))  # a source some field has
        b = cl.DivergenceFree(periodic=p, value=f)  # the same rows, another value
        with pytest.raises(IncompatibleConstraintsError):
            enforce_local(u, a, b)


def test_stacked_refusals_name_what_was_given():
    u = torch.randn(1, 3, 6, 6, dtype=F64)
    cons = CASES["overlap"](False)
    with pytest.raises(NotImplementedError, match="lift=0"):
        enforce_local(u, *cons, cl.Neumann(0.0, dim=0))
    with pytest.raises(NotImplementedError, match="bounds"):
        enforce_local(u, *cons, cl.Bounds(-1.0, 1.0))
