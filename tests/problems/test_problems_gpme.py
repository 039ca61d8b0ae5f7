"""Closed forms of the conservation paper: masses, Stefan constants, fronts, samplers, data."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from constraint_layers.problems import (
    Diffusion,
    InviscidBurgers,
    LinearAdvection,
    PorousMedium,
    Stefan,
    stefan_z1,
)

integrate = pytest.importorskip("scipy.integrate")
special = pytest.importorskip("scipy.special")

F64 = torch.float64

# (class, parameter values, times): parameters cover the train range ends and the test values
CASES = [
    (Diffusion, [1.0, 3.3, 5.0], [0.0, 0.1, 0.5, 1.0]),
    (PorousMedium, [1.0, 2.5, 3.0, 6.0], [0.01, 0.25, 0.5, 0.99, 1.0, 1.3]),
    (Stefan, [0.2, 0.5, 0.55, 0.6, 0.7], [0.001, 0.05, 0.1, 0.6]),  # 0.2 at 0.6: front > 1
    (LinearAdvection, [1.0, 3.0, 5.0], [0.0, 0.05, 0.1, 0.3, 1.0]),
    (InviscidBurgers, [1.0, 2.0, 3.0, 4.0], [0.1, 0.3, 0.5, 0.8, 1.0]),
]


def _quad(problem, t: float) -> float:
    """scipy quad of the closed form over the domain, split at the front (the jump)."""

    def f(x: float) -> float:
        return float(problem.solution(torch.tensor(t, dtype=F64), torch.tensor(x, dtype=F64)))

    lo, hi = problem.domain
    points = []
    if hasattr(problem, "front"):
        xf = float(problem.front(torch.tensor(t, dtype=F64)))
        points = [xf] if lo < xf < hi else []
    if isinstance(problem, InviscidBurgers) and float(problem.a) * t < 1:
        points += [float(problem.a) * t - 1.0, 0.0]
    edges = [lo, *sorted(p for p in points if lo < p < hi), hi]
    return sum(
        integrate.quad(f, a, b, epsabs=1e-13, epsrel=1e-13, limit=400)[0]
        for a, b in itertools.pairwise(edges)
    )


@pytest.mark.parametrize(("cls", "params", "times"), CASES, ids=lambda c: getattr(c, "name", ""))
def test_analytic_mass_matches_quadrature(cls, params, times):
    for p in params:
        problem = cls(p)
        for t in times:
            mass = float(problem.mass(torch.tensor(t, dtype=F64)))
            assert abs(mass - _quad(problem, t)) < 1e-8, (cls.__name__, p, t)


def test_stefan_constants_match_the_paper():
    s = Stefan(0.6)
    t = torch.tensor(0.05, dtype=F64)
    assert float(s.alpha) == pytest.approx(1.0513, abs=5e-5)
    assert float(s.c1) == pytest.approx(0.7370, abs=5e-5)
    assert float(s.front(t)) == pytest.approx(0.2351, abs=5e-5)
    assert float(s.mass(t)) == pytest.approx(0.18595, abs=5e-6)
    s5 = Stefan(0.5)
    assert float(s5.alpha) == pytest.approx(1.2401, abs=5e-5)
    assert float(s5.front(t)) == pytest.approx(0.2773, abs=5e-5)


def test_stefan_root_against_scipy_and_rankine_hugoniot():
    u = torch.tensor([0.1, 0.3, 0.5, 0.6, 0.7, 0.9], dtype=F64)
    z1 = stefan_z1(u)
    optimize = pytest.importorskip("scipy.optimize")
    for ui, zi in zip(u.tolist(), z1.tolist()):
        ref = optimize.brentq(
            lambda z, ui=ui: (
                ui * special.erf(z) * z * math.exp(z * z) - (1 - ui) / math.sqrt(math.pi)
            ),
            1e-12,
            10.0,
            xtol=1e-15,
        )
        assert zi == pytest.approx(ref, abs=1e-13)
    # the jump u* times the front speed equals the flux arriving from the left (mass conservation)
    s = Stefan(u)
    t = torch.tensor(0.04, dtype=F64)
    speed = s.alpha / (2 * torch.sqrt(t))
    flux = s.c1 * torch.exp(-(s.z1**2)) / torch.sqrt(math.pi * t)
    torch.testing.assert_close(u * speed, flux, rtol=1e-12, atol=0)


def test_stefan_values_at_the_front_and_the_wall():
    s = Stefan(0.6)
    t = torch.tensor(0.05, dtype=F64)
    xf = s.front(t)
    assert float(s.solution(t, xf)) == pytest.approx(0.6, abs=1e-12)  # jumps from u* ...
    assert float(s.solution(t, xf + 1e-9)) == 0.0  # ... to 0
    assert float(s.solution(t, torch.tensor(0.0, dtype=F64))) == 1.0  # boundary value
    zero = torch.zeros((), dtype=F64)
    assert float(s.solution(zero, zero)) == 1.0
    assert float(s.solution(zero, torch.tensor(0.3, dtype=F64))) == 0.0
    assert float(s.mass(zero)) == 0.0


def test_pme_and_burgers_fronts_and_known_values():
    pme = PorousMedium(torch.tensor([1.0, 3.0, 6.0], dtype=F64))
    t = torch.tensor(0.5, dtype=F64)
    torch.testing.assert_close(pme.front(t), torch.full((3,), 0.5, dtype=F64))
    torch.testing.assert_close(pme.solution(t, t), torch.zeros(3, dtype=F64))
    m = pme.m
    torch.testing.assert_close(pme.solution(t, torch.zeros((), dtype=F64)), (m * t) ** (1 / m))
    b = InviscidBurgers(torch.tensor([1.0, 3.0], dtype=F64))
    torch.testing.assert_close(b.front(t), torch.tensor([0.0, 0.25], dtype=F64))
    torch.testing.assert_close(b.solution(t, torch.tensor(-1.0, dtype=F64)), b.a)  # inflow


def test_broadcasting_dtype_and_on_grid():
    p = PorousMedium(torch.tensor([1.0, 2.0], dtype=F64))
    t32 = torch.linspace(0, 1, 5)
    x32 = torch.linspace(0, 1, 7)
    grid = p.on_grid(t32, x32)
    assert grid.shape == (2, 5, 7) and grid.dtype == torch.float32
    batch = PorousMedium(p.m[:, None, None])
    direct = batch.solution(t32[:, None].double(), x32[None, :].double())
    assert direct.shape == (2, 5, 7) and direct.dtype == F64
    torch.testing.assert_close(direct.float(), grid)
    assert Stefan(0.6).solution(0.01, 0.1).dtype == torch.get_default_dtype()
    one = Diffusion(2.0).solution(torch.tensor([0.5], dtype=F64), torch.tensor([1.0], dtype=F64))
    assert one.dtype == F64
    with pytest.raises(ValueError, match="broadcast"):
        p.solution(torch.zeros(3), torch.zeros(3))


@pytest.mark.parametrize("cls", [Diffusion, PorousMedium, Stefan, LinearAdvection, InviscidBurgers])
def test_parameter_samplers(cls):
    a = cls.train_params(500, seed=3)
    b = cls.train_params(500, seed=3)
    assert torch.equal(a, b) and a.dtype == F64 and a.shape == (500,)
    lo, hi = cls.TRAIN_RANGE
    assert float(a.min()) >= lo and float(a.max()) <= hi
    assert not torch.equal(a, cls.train_params(500, seed=4))
    test = cls.test_params(50)
    assert test.shape == (50 * len(cls.TEST_PARAMS),)
    assert sorted(set(test.tolist())) == sorted(cls.TEST_PARAMS)
    assert cls.t_range[0] <= cls.t_star <= cls.t_range[1]


@pytest.mark.parametrize(
    ("call", "exc"),
    [
        (lambda: Stefan(1.0), ValueError),
        (lambda: Stefan(0.0), ValueError),
        (lambda: PorousMedium(-1.0), ValueError),
        (lambda: Diffusion(float("nan")), ValueError),
        (lambda: Diffusion("1"), TypeError),
        (lambda: InviscidBurgers(0.0), ValueError),
        (lambda: PorousMedium.train_params(0), ValueError),
        (lambda: PorousMedium.train_params(10, seed=-1), ValueError),
        (lambda: PorousMedium.train_params(10, seed=1.5), TypeError),
        (lambda: PorousMedium(2.0).neural_process_data(), ValueError),  # not a batch
        (lambda: Stefan(Stefan.test_params(1)).operator_data(task="x"), ValueError),
    ],
)
def test_bad_input_raises(call, exc):
    with pytest.raises(exc):
        call()


def test_neural_process_data_layout_and_sampling():
    params = Stefan.test_params(3)
    data = Stefan(params).neural_process_data(seed=5)
    n = params.numel()
    assert data.context_x.shape == (n, 100, 2) and data.context_y.shape == (n, 100, 1)
    assert data.target_x.shape == (n, 100, 2) and data.target_mass.shape == (n, 10)
    assert data.grid_u.shape == (n, 201, 201) and data.grid_mass.shape == (n, 201)
    # context: 10 stratified times (one per bin), 10 sorted positions shared by every time
    ct = data.context_x[..., 0].reshape(n, 10, 10).double()
    cx = data.context_x[..., 1].reshape(n, 10, 10)
    assert torch.equal(ct, ct[:, :, :1].expand_as(ct))
    bins = torch.floor(ct[:, :, 0] / 0.1 * 10)
    assert torch.equal(bins, torch.arange(10.0, dtype=F64).expand(n, 10))
    assert torch.equal(cx, cx[:, :1].expand_as(cx))
    assert bool((cx[:, 0, 1:] >= cx[:, 0, :-1]).all())
    # values are the closed form, the mass is the analytic one
    s = Stefan(params[:, None])
    torch.testing.assert_close(
        data.target_y[..., 0], s.solution(data.target_x[..., 0], data.target_x[..., 1])
    )
    torch.testing.assert_close(data.target_mass, Stefan(params[:, None]).mass(data.target_t))
    t_star_row = round(Stefan.t_star / 0.1 * 200)
    torch.testing.assert_close(data.grid_mass[:, t_star_row], s.mass(0.05)[:, 0].float())
    again = Stefan(params).neural_process_data(seed=5)
    assert torch.equal(again.context_x, data.context_x) and torch.equal(again.grid_u, data.grid_u)
    small = PorousMedium(PorousMedium.train_params(20)).neural_process_data(dense=False)
    assert small.grid_u is None


def test_neural_process_dense_grid_is_refused_when_huge():
    with pytest.raises(ValueError, match="dense=False"):
        PorousMedium(PorousMedium.train_params(10000)).neural_process_data(dtype=F64)


def test_closed_form_operator_data():
    p = PorousMedium(PorousMedium.test_params(2))
    frames = p.operator_data(resolution=33, coords=True, dtype=F64)
    assert frames.x.shape == (6, 3, 33, 25) and frames.y.shape == (6, 1, 33, 25)
    torch.testing.assert_close(
        frames.x[:, 1, :, 0], torch.linspace(0, 1, 33, dtype=F64).expand(6, 33)
    )
    assert float(frames.coords["t"][-1]) == 1.0
    single = p.operator_data(task="single", resolution=33)
    assert single.y.shape == (6, 1, 33)
    torch.testing.assert_close(
        single.y[:, 0].double(),
        p.on_grid(torch.tensor([0.5]), torch.linspace(0, 1, 33))[:, 0].double(),
    )
