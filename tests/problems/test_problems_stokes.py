"""Stokes' second problem: closed form, finite-interval solution against finite differences,
Dirichlet data held bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import constraint_layers as cl
from constraint_layers.problems import Stokes

integrate = pytest.importorskip("scipy.integrate")
sparse = pytest.importorskip("scipy.sparse")

F64 = torch.float64


def fd_stokes(problem: Stokes, omega: float, u0: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Independent reference: second-order finite differences on the interior nodes with the
    Dirichlet data of both ends, a stiff high-accuracy ODE integrator in time. (nodes, T)."""
    nodes = u0.size
    h = problem.length / (nodes - 1)
    m = nodes - 2
    a = sparse.diags([np.ones(m - 1), -2.0 * np.ones(m), np.ones(m - 1)], [-1, 0, 1], format="csr")
    a = a * (problem.nu / h**2)
    kappa = math.sqrt(omega / (2 * problem.nu))
    amp, length = problem.amplitude, problem.length

    def ends(t: float) -> tuple[float, float]:
        return amp * math.cos(omega * t), amp * math.exp(-kappa * length) * math.cos(
            kappa * length - omega * t
        )

    def rhs(t: float, u: np.ndarray) -> np.ndarray:
        out = a @ u
        lo, hi = ends(t)
        out[0] += problem.nu * lo / h**2
        out[-1] += problem.nu * hi / h**2
        return out

    sol = integrate.solve_ivp(
        rhs, (0.0, float(times[-1])), u0[1:-1], method="BDF", jac=a, t_eval=times,
        rtol=1e-11, atol=1e-12,
    )  # fmt: skip
    assert sol.success
    lo, hi = zip(*[ends(float(t)) for t in times])
    return np.vstack([np.array(lo)[None], sol.y, np.array(hi)[None]])


def test_half_line_closed_form_solves_the_pde():
    s = Stokes()
    omega = torch.tensor([2.0, 5.0], dtype=F64)
    t = torch.tensor([0.3, 0.9], dtype=F64)
    x = torch.tensor([0.0, 0.2, 0.7], dtype=F64)
    u = s.half_line(omega, t, x)
    torch.testing.assert_close(u[:, 0], torch.cos(omega[:, None] * t[None]))  # the plate
    # u_t - nu u_xx = 0, by central differences with a small step
    d = 1e-4
    ut = (s.half_line(omega, t + d, x) - s.half_line(omega, t - d, x)) / (2 * d)
    uxx = (s.half_line(omega, t, x + d) - 2 * u + s.half_line(omega, t, x - d)) / d**2
    assert (ut - s.nu * uxx).abs().max() < 1e-5


def test_without_perturbation_the_data_is_the_half_line_solution():
    s = Stokes(perturbation=0.0)
    data = s.generate(5, resolution=101, dtype=F64, cache=False)
    exact = s.half_line(data.params["omega"], data.coords["t"], data.coords["x"])
    torch.testing.assert_close(data.y[:, 0], exact, rtol=0, atol=1e-15)


def test_finite_differences_converge_to_the_solution_at_second_order():
    s = Stokes()
    gen = torch.Generator().manual_seed(0)
    omega = torch.tensor([2.5, 5.5], dtype=F64)
    coeffs = 0.5 * torch.randn(2, s.n_modes, generator=gen, dtype=F64)
    coeffs /= torch.arange(1, s.n_modes + 1, dtype=F64) ** 2
    times = np.array([0.3, 0.6, 1.2])
    errors = []
    for nodes in (33, 65, 129):
        x = torch.linspace(0, s.length, nodes, dtype=F64)
        exact = s.solution(omega, coeffs, torch.tensor(times), x).numpy()
        u0 = s.solution(omega, coeffs, torch.zeros(1, dtype=F64), x)[..., 0].numpy()
        errors.append(
            max(
                np.abs(fd_stokes(s, float(w), u0[i], times) - exact[i]).max()
                for i, w in enumerate(omega)
            )
        )
    print("stokes FD vs exact, N = 33, 65, 129:", errors)
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert errors[-1] < 1e-4
    assert min(orders) > 1.9, (errors, orders)


def test_dirichlet_data_hold_bit_for_bit():
    data = Stokes().generate(6, resolution=64, dtype=torch.float32, cache=False)
    bcs = [
        cl.Dirichlet(data.boundary["x_low"], dim=0, side="low"),
        cl.Dirichlet(data.boundary["x_high"], dim=0, side="high"),
    ]
    assert cl.metrics.boundary_error(data.y, bcs).max() == 0.0
    omega = data.params["omega"].double()
    t = data.coords["t"].double()
    torch.testing.assert_close(
        data.boundary["x_low"][:, 0].double(), torch.cos(omega[:, None] * t), rtol=0, atol=1e-6
    )
    assert data.y.shape == (6, 1, 64, 25)
    assert float(data.coords["t"][-1]) == pytest.approx(1.2)
    assert data.params["coefficients"].shape == (6, 16)
    # the input is the initial condition, which meets the plate value at t = 0
    assert torch.equal(data.x[:, 0, 0, 0], torch.ones(6))


def test_stokes_bad_input():
    with pytest.raises(ValueError, match="nu must be > 0"):
        Stokes(nu=-1.0)
    with pytest.raises(ValueError, match="perturbation must be >= 0"):
        Stokes(perturbation=-0.1)
    with pytest.raises(ValueError, match="shape"):
        Stokes().solution(torch.ones(2), torch.ones(2), torch.ones(1), torch.ones(3))
