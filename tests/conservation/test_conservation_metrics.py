"""Metrics: CE, MSE, log-likelihood, shock position, mass_over_time."""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl

F64 = torch.float64


def test_conservation_error_signed_and_batched():
    x = torch.linspace(0, 1, 101, dtype=F64)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    u = (x.reshape(-1, 1) + t).reshape(1, 1, 101, 3).expand(2, 1, 101, 3)  # (B, C, x, t)
    c = cl.Conservation.integral(torch.tensor([0.5, 1.0, 2.0], dtype=F64), dim=0)
    ce = cl.metrics.conservation_error(u, c)
    assert ce.shape == (2, 3)
    torch.testing.assert_close(ce, torch.tensor([[0.0, 0.0, -0.5]] * 2, dtype=F64))
    G = torch.ones(2, 4, dtype=F64)
    torch.testing.assert_close(
        cl.metrics.conservation_error(torch.ones(3, 4, dtype=F64), G, torch.tensor([4.0, 5.0])),
        torch.tensor([[0.0, -1.0]] * 3, dtype=F64),
    )
    both = cl.metrics.conservation_error(u, [c, cl.Conservation.integral(0.0, dim=1)])
    assert both.shape == (2, 3 + 101)


def test_mse_and_log_likelihood():
    a, b = torch.zeros(2, 3, 5), torch.ones(2, 3, 5)
    assert cl.metrics.mse(a, b).shape == (2, 3)
    assert float(cl.metrics.mse(a, b, dim=None)) == 1.0
    ll = cl.metrics.gaussian_log_likelihood(b, a, torch.full_like(a, 4.0))
    torch.testing.assert_close(
        ll, torch.full((2, 3), -0.5 * (math.log(8 * math.pi) + 0.25), dtype=F64)
    )
    with pytest.raises(ValueError, match="min_variance"):
        cl.metrics.gaussian_log_likelihood(b, a, torch.zeros_like(a))
    ll = cl.metrics.gaussian_log_likelihood(a, a, torch.zeros_like(a), min_variance=1e-8)
    assert bool(torch.isfinite(ll).all())


def test_shock_position_uses_grid_positions():
    x = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=F64)
    s = torch.tensor([[1.0, 0.5, -0.1, 0.2, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    pos = cl.metrics.shock_position(s, x)
    assert pos[0].item() == 0.3 and math.isnan(pos[1].item())
    samples = torch.ones(7, 2, 201)
    samples[..., 100:] = 0.0
    assert bool((cl.metrics.shock_position(samples) == 0.5).all())  # x_i = i / (N - 1)
    assert cl.metrics.shock_position(samples.transpose(-1, 0), dim=0).shape == (2, 7)
    with pytest.raises(ValueError, match=r"\(201,\)"):
        cl.metrics.shock_position(samples, torch.zeros(5))


def test_mass_over_time():
    t = torch.tensor([0.0, 0.1, 0.4, 1.0], dtype=F64)
    m = cl.mass_over_time(0.5, 2.0 * t, t=t)  # inflow 2 t: U = 0.5 + t^2 (trapezoid exact)
    torch.testing.assert_close(m, 0.5 + t**2)
    faces = [torch.ones(2, 5), -0.5 * torch.ones(2, 5)]  # inflow at x = 0, outflow at x = 1
    per_sample = cl.mass_over_time(torch.tensor([0.0, 1.0]), faces, dt=0.25)
    torch.testing.assert_close(per_sample[:, -1], torch.tensor([0.5, 1.5]))
    assert cl.mass_over_time(1.0, 0.0, num_times=3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="num_times"):
        cl.mass_over_time(1.0, 0.5)
    # Stefan (u* = 0.6): inflow c1 / sqrt(pi t) through x = 0; mass 2 c1 sqrt(t / pi)
    c1 = 0.7370
    tt = torch.linspace(0, 0.05, 2001, dtype=F64) ** 2 / 0.05  # clustered near t = 0
    inflow = c1 / torch.sqrt(math.pi * tt.clamp_min(1e-300))
    inflow[0] = 0.0
    m = cl.mass_over_time(0.0, inflow, t=tt)
    assert abs(float(m[-1]) - 2 * c1 * math.sqrt(0.05 / math.pi)) < 2e-3
