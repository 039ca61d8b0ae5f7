"""Neumann walls + a total + bounds (a lower bound only, or an infinite upper one): exact, and equal
to the dense float64 QP reference (issue 18, engine)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.rows import GridSpec
from constraint_layers.testing import reference_prediction
from constraint_layers.testing.reference import dense_qp

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _check(y, x, cons, lower, *, dtype, ref=True, **grid):
    """Every row holds at the dtype's tolerance, every value is in the bounds exactly, and (in
    float64) the result equals the dense QP reference."""
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    walls = [c for c in cons if c.family == "boundary"]
    totals = [c for c in cons if c.family == "conservation"]
    scale = float(y.abs().max()) + 1e-2
    hs = [1.0 / (s - 1) for s in y.shape[2:]]
    assert float(cl.metrics.boundary_error(y, walls).max()) * min(hs) <= tol * scale
    for c in totals:
        assert float(cl.metrics.conservation_error(y, c).abs().max()) <= tol * scale
    assert bool((y >= lower).all())
    if ref:
        pred = cl.functional.Gaussian(x.to(F64), event_ndim=x.ndim - 1)
        want, _ = reference_prediction(pred, cons, grid=GridSpec(**grid))
        torch.testing.assert_close(y.to(F64), want, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("upper", [None, math.inf])
def test_neumann_total_and_a_lower_bound_1d(dtype, upper):
    for seed in range(20):
        x = (0.03 * torch.randn(1, 1, 64, generator=_gen(seed))).to(dtype)
        cons = [cl.Neumann(0.0), cl.Conservation.integral(-0.005), cl.Bounds(-0.01, upper)]
        y = cl.wrap(nn.Identity(), *cons)(x)
        _check(y, x, cons, -0.01, dtype=dtype, ref=dtype == F64)


def test_the_reported_case_seed_5():
    x = 0.03 * torch.randn(1, 1, 64, generator=_gen(5))
    cons = [cl.Neumann(0.0), cl.Conservation.integral(-0.005), cl.Bounds(lower=-0.01)]
    for dtype in (torch.float32, F64):
        y = cl.wrap(nn.Identity(), *cons)(x.to(dtype))
        _check(y, x.to(dtype), cons, -0.01, dtype=dtype, ref=dtype == F64)


@pytest.mark.parametrize("upper", [None, math.inf])
def test_an_insulated_2d_box_with_a_lower_bound(upper):
    """Walls on both axes, the total heat over the box, non-negative values."""
    for seed in range(3):
        x = torch.randn(2, 1, 12, 10, dtype=F64, generator=_gen(seed))
        cons = [cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1),
                cl.Conservation.integral(0.4, dim=(0, 1)), cl.Bounds(0.0, upper)]  # fmt: skip
        y = cl.wrap(nn.Identity(), *cons)(x)
        _check(y, x, cons, 0.0, dtype=F64)
        assert bool((y == 0).any())  # the bound is active


def test_an_insulated_2d_box_under_a_small_fno():
    neuralop = pytest.importorskip("neuralop")
    torch.manual_seed(0)
    fno = neuralop.models.FNO(n_modes=(4, 4), hidden_channels=8, in_channels=1, out_channels=1)
    cons = [cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1),
            cl.Conservation.integral(0.2, dim=(0, 1)), cl.Bounds(lower=0.0)]  # fmt: skip
    model = cl.wrap(fno, *cons)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y = model(x)
        base = fno(x)
    _check(y, base, cons, 0.0, dtype=torch.float32, ref=False)
    pred = cl.functional.Gaussian(base.to(F64), event_ndim=3)
    want, _ = reference_prediction(pred, cons)
    torch.testing.assert_close(y.to(F64), want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_dense_qp_checks_its_answer_against_the_kkt_conditions():
    u = torch.tensor([0.5, -0.2, 1.0, 0.3], dtype=F64)
    E = torch.ones(1, 4, dtype=F64)
    A = torch.eye(4, dtype=F64)  # x >= 0
    x = dense_qp(u, E, torch.tensor([1.2], dtype=F64), A, torch.zeros(4, dtype=F64))
    torch.testing.assert_close(x, torch.tensor([0.3, 0.0, 0.8, 0.1], dtype=F64))
    with pytest.raises(ValueError, match="no common point"):
        dense_qp(u, E, torch.tensor([-1.0], dtype=F64), A, torch.zeros(4, dtype=F64))


def test_walls_total_and_active_bounds_at_64x64_hold_exactly():
    """The size that took minutes through the dense general solver: every row, every bound (and
    the optimality conditions, through the reference at a smaller size above)."""
    x = torch.randn(2, 1, 64, 64, dtype=F64, generator=_gen(0))
    cons = [cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1),
            cl.Conservation.integral(0.4, dim=(0, 1)), cl.Bounds(lower=0.0)]  # fmt: skip
    y = cl.wrap(nn.Identity(), *cons)(x)
    _check(y, x, cons, 0.0, dtype=F64, ref=False)
    assert int((y == 0).sum()) > 1000  # the bound is active on a large part of the box


def test_gradients_through_the_walls_and_the_bounds():
    x = (0.03 * torch.randn(2, 1, 12, generator=_gen(3))).double().requires_grad_(True)
    cons = [cl.Neumann(0.0), cl.Conservation.integral(-0.005), cl.Bounds(lower=-0.01)]
    model = cl.wrap(nn.Identity(), *cons)
    assert torch.autograd.gradcheck(model, (x,))


CASES = [
    # (constraints, shape, bounds): walls of every kind, totals per frame, two-sided boxes
    (lambda: [cl.Neumann(0.0, order=3), cl.Conservation.integral(0.3)], (3, 1, 15), (0.0, 0.5)),
    (
        lambda: [
            cl.Dirichlet(0.0, side="low"),
            cl.Neumann(0.5, side="high"),
            cl.Conservation.integral(0.2),
        ],
        (2, 1, 13),
        (0.0, None),
    ),
    (
        lambda: [
            cl.Neumann(0.0, dim=0),
            cl.Conservation.integral(torch.linspace(0.05, 0.25, 6), dim=0),
        ],
        (2, 1, 9, 6),
        (0.0, 0.3),
    ),
    (
        lambda: [
            cl.Periodic(dim=1),
            cl.Neumann(0.0, dim=0),
            cl.Conservation.integral(0.1, dim=(0, 1)),
        ],
        (2, 1, 8, 7),
        (-0.05, 0.4),
    ),
    (
        lambda: [
            cl.Neumann(0.0),
            cl.Conservation.integral(0.2),
            cl.Conservation(torch.linspace(0, 1, 11), 0.3),
        ],
        (2, 1, 11),
        (0.0, None),
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_walls_totals_and_boxes_equal_the_dense_qp(case):
    make, shape, (lower, upper) = CASES[case]
    for seed in range(4):
        x = 0.3 * torch.randn(shape, dtype=F64, generator=_gen(seed))
        cons = [*make(), cl.Bounds(lower, upper)]
        for lift in (0, 2) if len(shape) == 3 and case != 1 else (0,):
            y = cl.wrap(nn.Identity(), *cons, lift=lift)(x)
            assert bool((y >= lower).all()) and (upper is None or bool((y <= upper).all()))
            pred = cl.functional.Gaussian(x, event_ndim=x.ndim - 1)
            want, _ = reference_prediction(pred, cons, lift=lift)
            scale = float(want.abs().max()) + 1e-2
            torch.testing.assert_close(y, want, rtol=0, atol=1e-10 * scale)


def test_a_batch_solves_as_its_samples_do_alone():
    """The faces solver iterates the whole batch together, each sample with its own active sets
    (here: per-sample bounds, from inactive to active on most nodes, and a sample already
    feasible): every sample equals its own call and the dense QP reference."""
    g = _gen(11)
    x = 0.3 * torch.randn(6, 1, 10, 9, dtype=F64, generator=g)
    x[2] = x[2].abs() + 0.5  # inside the bounds already, the total aside
    lower = torch.tensor([-1.0, 0.0, -0.2, 0.05, -0.01, 0.02], dtype=F64).reshape(6, 1, 1, 1)
    lower = lower.expand(6, 1, 10, 9)
    upper = lower + torch.tensor([3.0, 0.6, 5.0, 0.5, 0.4, 2.0], dtype=F64).reshape(6, 1, 1, 1)
    totals = torch.tensor([0.2, 0.1, 0.9, 0.3, 0.15, 0.4], dtype=F64)
    cons = [
        cl.Neumann(0.0, dim=0),
        cl.Dirichlet(0.1, dim=1, side="low"),
        cl.Conservation.integral(totals[:, None], dim=(0, 1)),
        cl.Bounds(lower=cl.Given("lo"), upper=cl.Given("hi")),
    ]  # fmt: skip
    model = cl.wrap(nn.Identity(), *cons)
    y = model(x, lo=lower, hi=upper)
    for s in range(6):
        alone = [
            cons[0], cons[1],
            cl.Conservation.integral(float(totals[s]), dim=(0, 1)),
            cl.Bounds(lower=lower[s : s + 1], upper=upper[s : s + 1]),
        ]  # fmt: skip
        ys = cl.wrap(nn.Identity(), *alone)(x[s : s + 1])
        scale = float(ys.abs().max()) + 1e-2
        torch.testing.assert_close(y[s : s + 1], ys, rtol=0, atol=1e-12 * scale)
        pred = cl.functional.Gaussian(x[s : s + 1], event_ndim=3)
        want, _ = reference_prediction(pred, alone)
        torch.testing.assert_close(ys, want, rtol=0, atol=1e-10 * scale)


def test_gradients_through_a_batch_with_different_active_sets():
    g = _gen(4)
    x = (0.3 * torch.randn(3, 1, 6, 5, dtype=F64, generator=g)).requires_grad_(True)
    lower = torch.tensor([-1.0, 0.0, 0.05], dtype=F64).reshape(3, 1, 1, 1).expand(3, 1, 6, 5)
    cons = [cl.Neumann(0.0, dim=0), cl.Conservation.integral(0.3, dim=(0, 1)),
            cl.Bounds(lower=lower)]  # fmt: skip
    model = cl.wrap(nn.Identity(), *cons)
    assert torch.autograd.gradcheck(model, (x,))
