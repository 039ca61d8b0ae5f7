"""The 2D Navier-Stokes solver: exact Taylor-Green decay, fourth order in time, inviscid
invariants, the energy budget, and divergence-free velocities (spectrally)."""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl
from constraint_layers.problems import NavierStokes2D

F64 = torch.float64


@pytest.mark.parametrize("mode", [1, 3])
@pytest.mark.parametrize("n", [16, 32])
def test_taylor_green_decay_is_exact(n, mode):
    ns = NavierStokes2D(viscosity=0.05, extent=2 * math.pi)
    w = ns.solve(ns.taylor_green(n, 0.0, mode), t=0.8, dt=0.1)
    assert float((w - ns.taylor_green(n, 0.8, mode)).abs().max()) <= 1e-12 * 2 * mode


def test_fourth_order_in_time():
    ns = NavierStokes2D(viscosity=1e-3)
    w0 = ns.initial_condition(1, 32, seed=1)
    ref = ns.solve(w0, t=0.5, dt=0.5 / 256)
    errs = [float((ns.solve(w0, t=0.5, dt=dt) - ref).abs().max()) for dt in (0.1, 0.05, 0.025)]
    assert errs[0] / errs[1] > 12 and errs[1] / errs[2] > 12  # RK4: 16


def test_inviscid_invariants_and_energy_budget():
    ns0 = NavierStokes2D(viscosity=0.0)
    w0 = ns0.initial_condition(2, 32, seed=2)
    w = ns0.solve(w0, t=0.5, dt=0.01)
    for q in (ns0.energy, ns0.enstrophy):
        assert float(((q(w) - q(w0)) / q(w0)).abs().max()) < 1e-5
    nu = 0.01
    ns = NavierStokes2D(viscosity=nu)
    frames = ns.solve(w0, t=0.5, dt=0.005, record=100)  # (2, 100, n, n)
    ws = torch.cat([w0.unsqueeze(1), frames], 1)
    z = torch.stack([ns.enstrophy(ws[:, i]) for i in range(ws.shape[1])], 1)
    dissipated = 2 * nu * torch.trapezoid(z, dx=0.005, dim=1)  # dE/dt = -2 nu Z
    change = ns.energy(ws[:, -1]) - ns.energy(ws[:, 0])
    assert float(((change + dissipated) / dissipated).abs().max()) < 1e-3


def test_velocity_is_spectrally_divergence_free_and_gives_back_the_vorticity():
    ns = NavierStokes2D(viscosity=1e-3, forcing="li")
    w = ns.solve(ns.initial_condition(2, 32, seed=3), t=0.2, dt=0.01)
    assert bool(torch.isfinite(w).all())
    u = ns.velocity(w)
    assert u.shape == (2, 2, 32, 32)
    div = cl.DivergenceFree(periodic=True, stencil="spectral").residual(u)
    assert float(div.abs().max()) <= 1e-12 * float(u.abs().max()) * 32
    assert float((ns.vorticity(u) - w).abs().max()) <= 1e-12 * float(w.abs().max())


def test_bad_input():
    with pytest.raises(ValueError, match="viscosity"):
        NavierStokes2D(viscosity=-1.0)
    with pytest.raises(ValueError, match="batch, n, n"):
        NavierStokes2D(viscosity=0.1).solve(torch.zeros(4, 4), t=1.0, dt=0.1)
