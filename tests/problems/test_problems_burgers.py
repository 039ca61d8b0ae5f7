"""Viscous Burgers: ETDRK4 against the Cole-Hopf closed form (4th order in time, spectral in
space), conservation of the mean, the random field, the periodic / Dirichlet data."""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl
from constraint_layers.problems import Burgers, evaluate_fourier, periodic_grf

F64 = torch.float64


def cole_hopf(nu: float, t: float, x: torch.Tensor, a: float = 1.0, b: float = 0.6) -> torch.Tensor:
    """u = -2 nu phi_x / phi with phi = a + b exp(-4 pi^2 nu t) cos(2 pi x) (a heat solution)."""
    e = math.exp(-4 * math.pi**2 * nu * t)
    return (
        4
        * math.pi
        * nu
        * b
        * e
        * torch.sin(2 * math.pi * x)
        / (a + b * e * torch.cos(2 * math.pi * x))
    )


TIMES = torch.tensor([0.1, 0.5, 1.0], dtype=F64)


def _error(points: int, dt: float) -> float:
    solver = Burgers(solver_points=points, dt=dt, grf_modes=min(64, points // 3))
    x = torch.arange(points, dtype=F64) / points
    u = solver.solve(cole_hopf(0.1, 0.0, x)[None], TIMES)[0]
    return max(
        float((u[:, i] - cole_hopf(0.1, float(t), x)).abs().max()) for i, t in enumerate(TIMES)
    )


def test_etdrk4_is_fourth_order_in_time():
    errors = [_error(128, dt) for dt in (1 / 50, 1 / 100, 1 / 200)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    print("burgers Cole-Hopf error, dt = 1/50, 1/100, 1/200:", errors, orders)
    assert min(orders) > 3.6, (errors, orders)


def test_space_discretisation_is_spectral():
    errors = [_error(points, 1 / 2000) for points in (24, 48, 96)]
    print("burgers Cole-Hopf error, M = 24, 48, 96 (dt = 1/2000):", errors)
    assert errors[0] > 1e3 * errors[2]  # faster than any power of h: x100 per doubling
    assert errors[2] < 1e-11


def test_default_step_agrees_with_a_much_finer_solve():
    coarse = Burgers().generate(4, dtype=F64, cache=False)
    fine = Burgers(dt=1 / 4000).generate(4, dtype=F64, cache=False)
    assert torch.equal(coarse.x, fine.x)
    err = float((coarse.y - fine.y).abs().max())
    print("burgers default dt=1e-3 vs dt=1/4000 (GRF data, |u| up to ~4):", err)
    assert err < 5e-8


def test_mean_is_conserved_and_energy_decays():
    solver = Burgers()
    gen = torch.Generator().manual_seed(1)
    v0 = solver.initial_modes(16, gen)
    modes = solver.solve_modes(v0, torch.linspace(0, 1, 11, dtype=F64)[1:])
    mean = modes[:, 0].real / solver.solver_points  # (n, T)
    assert (mean - (v0[:, 0].real / solver.solver_points)[:, None]).abs().max() < 1e-14
    energy = (modes.abs() ** 2).sum(dim=1)
    assert bool((energy[:, 1:] <= energy[:, :-1]).all())


def test_random_field_has_the_requested_spectrum():
    a0, a, b = periodic_grf(20000, 6, seed=0)
    k = torch.arange(1, 7, dtype=F64)
    expected = math.sqrt(2) * 25.0 / ((2 * math.pi * k) ** 2 + 25.0)
    torch.testing.assert_close(a.std(dim=0), expected, rtol=0.03, atol=0)
    torch.testing.assert_close(b.std(dim=0), expected, rtol=0.03, atol=0)
    assert abs(float(a0.std()) - 1.0) < 0.03
    x = torch.linspace(0, 1, 9, dtype=F64)
    values = evaluate_fourier(a0[:2], a[:2], b[:2], x)
    torch.testing.assert_close(values[:, 0], values[:, -1])  # periodic


def test_periodic_data_hold_bit_for_bit_and_match_the_solver():
    burgers = Burgers()
    data = burgers.generate(4, resolution=64, dtype=F64, cache=False)
    assert data.meta["bc"] == "periodic" and not data.boundary
    assert cl.metrics.boundary_error(data.y, [cl.Periodic(dim=0)]).max() == 0.0
    assert torch.equal(data.x[:, 0, 0], data.x[:, 0, -1])
    # resolution 65 contains the solver's nodes j / 256 for j = 0, 64, 128, 192, 256
    gen = torch.Generator().manual_seed(0)
    v0 = burgers.initial_modes(4, gen)
    on_solver_grid = burgers.solve(torch.fft.irfft(v0, n=256), data.coords["t"])
    coarse = burgers.generate(4, resolution=5, dtype=F64, cache=False)
    torch.testing.assert_close(coarse.y[:, 0, :-1], on_solver_grid[:, ::64], rtol=0, atol=1e-12)


def test_dirichlet_variant_carries_its_boundary_values():
    data = Burgers(bc="dirichlet").generate(5, dtype=torch.float32, cache=False)
    assert data.meta["bc"] == "dirichlet"
    assert data.boundary["x_low"].shape == (5, 1, 25)
    bcs = [
        cl.Dirichlet(data.boundary["x_low"], dim=0, side="low"),
        cl.Dirichlet(data.boundary["x_high"], dim=0, side="high"),
    ]
    assert cl.metrics.boundary_error(data.y, bcs).max() == 0.0
    # non-vacuous: the values vary from sample to sample and from frame to frame
    assert data.boundary["x_low"].std(dim=0).min() > 0
    assert data.boundary["x_low"].std(dim=-1).min() > 0
    paper = Burgers(bc="dirichlet").sizes("single")["paper"]
    assert paper == {"n": 600, "resolution": 500}


def test_burgers_bad_input():
    with pytest.raises(ValueError, match="bc must be one of"):
        Burgers(bc="neumann")
    with pytest.raises(ValueError, match="grf_modes"):
        Burgers(solver_points=64)
    with pytest.raises(ValueError, match="even"):
        Burgers(solver_points=257)
    with pytest.raises(ValueError, match="shape"):
        Burgers().solve(torch.zeros(2, 100), TIMES)
