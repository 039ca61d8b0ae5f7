"""Heat with Neumann walls: the series solver against an independent finite-difference solver,
the boundary conditions and the heat balance held by the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import constraint_layers as cl
from constraint_layers.problems import Heat

integrate = pytest.importorskip("scipy.integrate")
sparse = pytest.importorskip("scipy.sparse")

F64 = torch.float64
OMEGA = torch.tensor([2.01, 2.7, 3.5, 3.99], dtype=F64)


def fd_heat(problem: Heat, omega: float, nodes: int, times: np.ndarray) -> np.ndarray:
    """Independent reference: second-order ghost-point finite differences in space, a stiff
    high-accuracy ODE integrator in time. Returns (nodes, T)."""
    k, amp = problem.k, problem.flux_amplitude
    h = 1.0 / (nodes - 1)
    main = -2.0 * np.ones(nodes)
    upper = np.ones(nodes - 1)
    lower = np.ones(nodes - 1)
    upper[0] = 2.0  # u_{-1} = u_1 (zero flux at x = 0)
    lower[-1] = 2.0  # u_N = u_{N-2} + 2 h g(t)
    a = sparse.diags([lower, main, upper], [-1, 0, 1], format="csr") * (k / h**2)

    def rhs(t: float, u: np.ndarray) -> np.ndarray:
        out = a @ u
        out[-1] += 2.0 * k * amp * math.sin(math.pi * t) / h
        return out

    x = np.linspace(0.0, 1.0, nodes)
    sol = integrate.solve_ivp(
        rhs,
        (0.0, float(times[-1])),
        np.cos(omega * math.pi * x),
        method="BDF",
        jac=a,
        t_eval=times,
        rtol=1e-11,
        atol=1e-12,
    )
    assert sol.success
    return sol.y


def test_finite_differences_converge_to_the_series_at_second_order():
    heat = Heat()
    times = np.array([0.1, 0.3, 0.5])
    errors = []
    for nodes in (33, 65, 129, 257):
        x = torch.linspace(0, 1, nodes, dtype=F64)
        exact = heat.solution(OMEGA, torch.tensor(times), x).numpy()
        err = max(
            np.abs(fd_heat(heat, float(w), nodes, times) - exact[i]).max()
            for i, w in enumerate(OMEGA)
        )
        errors.append(err)
    print("heat FD vs series, N = 33..257:", errors)
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(3)]
    assert errors[-1] < 5e-4
    assert min(orders) > 1.9, (errors, orders)


def test_more_modes_change_nothing():
    heat = Heat()
    t = torch.linspace(0, 0.5, 26, dtype=F64)[1:]
    x = torch.linspace(0, 1, 101, dtype=F64)
    m = heat.n_modes(float(t[0]))
    base = heat.solution(OMEGA, t, x)
    assert (heat.solution(OMEGA, t, x, n_modes=4 * m) - base).abs().max() < 1e-13
    # and fewer modes do change it: the choice is not vacuous
    assert (heat.solution(OMEGA, t, x, n_modes=m // 4) - base).abs().max() > 1e-10


def test_initial_condition_is_exact_at_t0():
    heat = Heat()
    x = torch.linspace(0, 1, 33, dtype=F64)
    u = heat.solution(OMEGA, torch.tensor([0.0, 0.5], dtype=F64), x)
    assert torch.equal(u[..., 0], torch.cos(OMEGA[:, None] * math.pi * x))


def test_neumann_conditions_hold_in_the_data_at_third_order():
    """One-sided 3rd-order stencils of the data give the wall fluxes, error -> 0 like h^3."""
    times = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64)
    errs = []
    for nodes in (129, 257, 513):
        data = Heat().generate(4, resolution=nodes, times=times, dtype=F64, cache=False)
        bcs = [
            cl.Neumann(data.boundary["x_low"], dim=0, side="low", order=3),  # outward: -u_x(0) = 0
            cl.Neumann(
                data.boundary["x_high"], dim=0, side="high", order=3
            ),  # u_x(1) = U sin(pi t)
        ]
        errs.append(cl.metrics.boundary_error(data.y, bcs))
    print("heat Neumann residual, N = 129, 257, 513 (low, high):", [e.tolist() for e in errs])
    errs = torch.stack(errs)  # (3, 2)
    orders = torch.log2(errs[:-1] / errs[1:])
    assert errs[-1].max() < 1e-3
    assert bool((orders > 2.7).all()), (errs, orders)
    torch.testing.assert_close(
        data.boundary["x_high"][0, 0], 5.0 * torch.sin(math.pi * times), rtol=0, atol=1e-15
    )


def test_heat_balance():
    """d/dt of the total heat equals the flux through the walls, k (u_x(1) - u_x(0))."""
    heat = Heat()
    x = torch.linspace(0, 1, 4097, dtype=F64).numpy()
    delta = 1e-4
    for t in (0.05, 0.25, 0.5):
        times = torch.tensor([t - delta, t, t + delta], dtype=F64)
        u = heat.solution(OMEGA, times, torch.from_numpy(x)).numpy()
        mass = integrate.simpson(u, x=x, axis=1)  # (n, 3)
        torch.testing.assert_close(
            torch.from_numpy(mass), heat.mass(OMEGA, times), rtol=0, atol=1e-11
        )
        rate = (mass[:, 2] - mass[:, 0]) / (2 * delta)
        flux = heat.k * float(heat.flux(torch.tensor(t)))
        assert np.abs(rate - flux).max() < 1e-8


def test_generate_layout_and_values():
    heat = Heat()
    frames = heat.generate(6, resolution=65, coords=True, dtype=F64, cache=False)
    assert frames.x.shape == (6, 3, 65, 25) and frames.y.shape == (6, 1, 65, 25)
    assert frames.meta["bc"] == "neumann" and frames.axes == ("x", "t")
    t = frames.coords["t"]
    torch.testing.assert_close(t, torch.linspace(0, 0.5, 26, dtype=F64)[1:])
    x = frames.coords["x"]
    assert float(x[0]) == 0.0 and float(x[-1]) == 1.0
    omega = frames.params["omega"]
    assert float(omega.min()) >= 2.01 and float(omega.max()) <= 3.99
    torch.testing.assert_close(frames.x[:, 0, :, 3], torch.cos(omega[:, None] * math.pi * x))
    assert torch.equal(frames.x[:, 0, :, 0], frames.x[:, 0, :, -1])  # repeated along t
    torch.testing.assert_close(frames.x[:, 1, :, 0], x.expand(6, -1))  # both ends included
    torch.testing.assert_close(frames.x[:, 2, 0, :], t.expand(6, -1))
    torch.testing.assert_close(frames.y[:, 0], heat.solution(omega, t, x))
    single = heat.generate(6, task="single", resolution=65, dtype=F64, cache=False)
    assert single.y.shape == (6, 1, 65) and single.boundary["x_high"].shape == (6, 1)
    torch.testing.assert_close(single.y[:, 0], frames.y[:, 0, :, -1])


def test_heat_bad_input():
    with pytest.raises(ValueError, match="k must be > 0"):
        Heat(k=0.0)
    with pytest.raises(ValueError, match="low <= high"):
        Heat(omega_range=(4.0, 2.0))
    with pytest.raises(ValueError, match="times must be >= 0"):
        Heat().solution(OMEGA, torch.tensor([-0.1]), torch.zeros(3))
    with pytest.raises(ValueError, match="cosine modes"):
        Heat().solution(OMEGA, torch.tensor([1e-12]), torch.zeros(3))
    with pytest.raises(ValueError, match="task='single' takes one time"):
        Heat().generate(2, task="single", times=torch.tensor([0.1, 0.2]), cache=False)
    with pytest.raises(ValueError, match="strictly increasing"):
        Heat().generate(2, times=torch.tensor([0.2, 0.1]), cache=False)
