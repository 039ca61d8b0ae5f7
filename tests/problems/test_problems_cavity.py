"""Lid-driven cavity: the Poisson solver on a manufactured solution, grid convergence, the wall
rule held by the data, and the steady Re = 100 flow against Ghia et al. (1982)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import constraint_layers as cl
from constraint_layers.problems import Cavity, poisson_dirichlet, sine_series

F64 = torch.float64

# Ghia, Ghia & Shin (1982), Table I, Re = 100: u along the vertical line through the centre
GHIA_Y = [1.0, 0.9766, 0.9688, 0.9609, 0.9531, 0.8516, 0.7344, 0.6172, 0.5, 0.4531, 0.2813,
          0.1719, 0.1016, 0.0703, 0.0625, 0.0547, 0.0]  # fmt: skip
GHIA_U = [1.0, 0.84123, 0.78871, 0.73722, 0.68717, 0.23151, 0.00332, -0.13641, -0.20581,
          -0.21090, -0.15662, -0.10150, -0.06434, -0.04775, -0.04192, -0.03717, 0.0]  # fmt: skip


def test_poisson_solver_is_second_order_on_a_manufactured_solution():
    errors = []
    for nodes in (17, 33, 65):
        s = torch.linspace(0, 1, nodes, dtype=F64)[1:-1]
        x, y = s[:, None], s[None, :]
        exact = torch.sin(math.pi * x) * torch.sin(2 * math.pi * y) * torch.exp(x * y)
        # -Laplacian of exact, by hand
        e = torch.exp(x * y)
        sx, cx = torch.sin(math.pi * x), torch.cos(math.pi * x)
        sy, cy = torch.sin(2 * math.pi * y), torch.cos(2 * math.pi * y)
        lap = e * (
            -(math.pi**2) * sx * sy + 2 * math.pi * y * cx * sy + y**2 * sx * sy
            - 4 * math.pi**2 * sx * sy + 4 * math.pi * x * sx * cy + x**2 * sx * sy
        )  # fmt: skip
        psi = poisson_dirichlet(-lap[None].expand(3, -1, -1), 1 / (nodes - 1))
        errors.append(float((psi - exact).abs().max()))
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    print("cavity Poisson error, N = 17, 33, 65:", errors)
    assert min(orders) > 1.95, (errors, orders)


def test_poisson_solver_inverts_the_five_point_laplacian_exactly():
    gen = torch.Generator().manual_seed(0)
    psi = torch.randn(2, 9, 9, generator=gen, dtype=F64)
    h = 0.1
    pad = torch.nn.functional.pad(psi, (1, 1, 1, 1))
    lap = (
        pad[:, 2:, 1:-1] + pad[:, :-2, 1:-1] + pad[:, 1:-1, 2:] + pad[:, 1:-1, :-2] - 4 * psi
    ) / h**2
    torch.testing.assert_close(poisson_dirichlet(-lap, h), psi, rtol=0, atol=1e-12)


def test_grid_convergence_is_second_order():
    """psi on the nodes of a 17-node grid at t = 0.25, one smooth initial vorticity, refined
    grids: successive differences shrink like h^2."""
    cavity = Cavity()
    coefficients = sine_series(1, (4, 4), amplitude=5.0, seed=3)
    samples = []
    for nodes in (33, 65, 129):
        w = cavity.solve(
            cavity.initial_vorticity(coefficients, nodes), torch.tensor([0.25], dtype=F64)
        )
        r = (nodes - 1) // 16
        samples.append(cavity.stream_function(w[..., 0])[0, ::r, ::r])
    d1 = float((samples[0] - samples[1]).abs().max())
    d2 = float((samples[1] - samples[2]).abs().max())
    print("cavity successive differences, N = 33/65, 65/129:", d1, d2)
    assert math.log2(d1 / d2) > 1.8


def test_data_hold_the_wall_rule_and_dirichlet_values():
    cavity = Cavity()
    data = cavity.generate(3, resolution=21, dtype=F64, cache=False)
    assert data.y.shape == (3, 1, 21, 21, 25) and data.x.shape == (3, 1, 21, 21, 25)
    assert data.axes == ("x", "y", "t") and float(data.coords["t"][-1]) == 2.0
    bcs = [
        cl.Dirichlet(data.boundary["x_low"], dim=0, side="low"),
        cl.Dirichlet(data.boundary["x_high"], dim=0, side="high"),
        cl.Dirichlet(data.boundary["y_low"], dim=1, side="low"),
        cl.Dirichlet(data.boundary["y_high"], dim=1, side="high"),
    ]
    assert cl.metrics.boundary_error(data.y, bcs).max() == 0.0
    # every frame's wall vorticity is Thom's formula of the stream function of its interior
    for frame in (0, 12, 24):
        w = data.y[:, 0, :, :, frame]
        again = cavity.wall_vorticity(cavity.stream_function(w), w)
        torch.testing.assert_close(again, w, rtol=1e-12, atol=1e-10)
    w0 = data.x[:, 0, :, :, 0]
    torch.testing.assert_close(cavity.wall_vorticity(cavity.stream_function(w0), w0), w0)
    # Thom's formula is the no-slip / lid condition at second order: the one-sided derivative
    # of psi at the walls gives the wall velocity up to O(h^2) (-2/h on the lid is the only
    # non-vacuous part here); and the stream function vanishes on the walls
    psi = cavity.stream_function(data.y[:, 0])
    assert psi[:, 0].abs().max() == 0 and psi[:, :, -1].abs().max() == 0
    # incompressible by construction: discrete divergence of the central velocities is 0
    u, v = cavity.velocity(data.y[:, 0, :, :, -1])
    h = 1 / 20
    div = (u[:, 2:, 1:-1] - u[:, :-2, 1:-1]) / (2 * h) + (v[:, 1:-1, 2:] - v[:, 1:-1, :-2]) / (
        2 * h
    )
    assert div[:, 1:-1, 1:-1].abs().max() < 1e-10
    assert bool((u[:, :, -1] == 1.0).all())


def test_steady_state_matches_ghia_et_al():
    cavity = Cavity()
    nodes = 33
    w = cavity.solve(torch.zeros(1, nodes, nodes, dtype=F64), torch.tensor([15.0], dtype=F64))
    u, _ = cavity.velocity(w[..., 0])
    column = u[0, (nodes - 1) // 2].numpy()
    u_line = np.interp(GHIA_Y, np.linspace(0, 1, nodes), column)
    err = np.abs(u_line - np.array(GHIA_U)).max()
    print("cavity steady centre-line u vs Ghia, N = 33, t = 15:", err)
    assert err < 0.015


def test_generate_is_seeded_and_refine_subsamples():
    base = Cavity().generate(2, resolution=9, dtype=F64, cache=False)
    again = Cavity().generate(2, resolution=9, dtype=F64, cache=False)
    assert torch.equal(base.y, again.y) and torch.equal(base.x, again.x)
    fine = Cavity(refine=2).generate(2, resolution=9, dtype=F64, cache=False)
    assert fine.y.shape == base.y.shape
    assert 0 < (fine.y - base.y)[:, :, 1:-1, 1:-1].abs().max() < 0.5 * base.y.abs().max()


def test_cavity_bad_input():
    with pytest.raises(ValueError, match="re must be > 0"):
        Cavity(re=0.0)
    with pytest.raises(ValueError, match=r"shape \(n, N, N\)"):
        Cavity().solve(torch.zeros(1, 5, 6), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="square"):
        poisson_dirichlet(torch.zeros(3, 4), 0.1)
    with pytest.raises(FloatingPointError, match="smaller dt"):
        Cavity(dt=0.5).solve(torch.ones(1, 17, 17, dtype=F64), torch.tensor([100.0]))
