"""Quadrature weights against scipy and polynomial exactness; grid errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate

from constraint_layers import quadrature as q
from constraint_layers.errors import GridError

F64 = torch.float64


def grid(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.cumsum(torch.rand(n, dtype=F64, generator=g) + 0.05, 0)
    return x - x[0]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 40), seed=st.integers(0, 1000))
def test_against_scipy_nonuniform(n, seed):
    x = grid(n, seed)
    y = torch.sin(3 * x) + x**2
    xs, ys = x.numpy(), y.numpy()
    assert abs(float(q.trapezoid(x) @ y) - integrate.trapezoid(ys, x=xs)) < 1e-12 * n
    assert abs(float(q.simpson(x) @ y) - integrate.simpson(ys, x=xs)) < 1e-12 * n
    right = float(((x[1:] - x[:-1]) * y[1:]).sum())
    assert abs(float(q.right_riemann(x) @ y) - right) < 1e-12 * n


@pytest.mark.parametrize("n", [3, 4, 7, 10])
def test_polynomial_exactness(n):
    x = grid(n, n)
    a, b = float(x[0]), float(x[-1])
    exact = {k: (b ** (k + 1) - a ** (k + 1)) / (k + 1) for k in range(4)}
    for k in (0, 1):
        assert abs(float(q.trapezoid(x) @ x**k) - exact[k]) < 1e-12
    for k in (0, 1, 2):
        assert abs(float(q.simpson(x) @ x**k) - exact[k]) < 1e-11
    u = torch.linspace(0, 1, 2 * n + 1, dtype=F64)  # uniform, even intervals: cubics
    assert abs(float(q.simpson(2 * n + 1) @ u**3) - 0.25) < 1e-14


def test_uniform_forms_and_periodic():
    assert q.trapezoid(5, extent=2.0).tolist() == [0.25, 0.5, 0.5, 0.5, 0.25]
    assert q.trapezoid(5, spacing=0.1).sum().item() == pytest.approx(0.4)
    w = q.trapezoid(16, extent=2 * np.pi, endpoint=False)
    x = torch.arange(16, dtype=F64) * 2 * np.pi / 16
    assert abs(float(w @ torch.cos(x) ** 2) - np.pi) < 1e-13  # spectral accuracy
    assert q.weights(4, "right").tolist() == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    assert q.trapezoid(3, dtype=torch.float32).dtype == torch.float32


def test_tensor_product_and_cumulative():
    w = q.tensor_product(q.trapezoid(11), q.simpson(9, extent=2.0))
    x = torch.linspace(0, 1, 11, dtype=F64).reshape(-1, 1)
    y = torch.linspace(0, 2, 9, dtype=F64).reshape(1, -1)
    assert abs(float((w * (x * y**2)).sum()) - 0.5 * 8 / 3) < 1e-12
    t = grid(12, 3)
    f = torch.exp(t)
    ours = q.cumulative_trapezoid(f, t, initial=1.0)
    ref = integrate.cumulative_trapezoid(f.numpy(), x=t.numpy(), initial=0) + 1.0
    assert np.abs(ours.numpy() - ref).max() < 1e-12
    batch = q.cumulative_trapezoid(torch.ones(2, 5, 3, dtype=F64), spacing=0.5, dim=1)
    assert batch[:, -1].tolist() == [[2.0] * 3] * 2


def test_grid_errors():
    with pytest.raises(GridError, match=r"x\[1\] = 0.5 >= x\[2\] = 0.2"):
        q.trapezoid(torch.tensor([0.0, 0.5, 0.2]))
    with pytest.raises(GridError, match="strictly increasing"):
        q.simpson(torch.tensor([0.0, 0.5, 0.5]))
    with pytest.raises(GridError, match="at least 3 grid nodes, got 2"):
        q.simpson(2)
    with pytest.raises(GridError, match="at least 2"):
        q.trapezoid(torch.tensor([1.0]))
    with pytest.raises(GridError, match="NaN"):
        q.trapezoid(torch.tensor([0.0, float("nan")]))
    with pytest.raises(GridError, match="1-D"):
        q.trapezoid(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="not both"):
        q.trapezoid(5, spacing=0.1, extent=1.0)
    with pytest.raises(ValueError, match="not both"):
        q.trapezoid(torch.linspace(0, 1, 5), spacing=0.1)
    with pytest.raises(GridError, match="positive"):
        q.trapezoid(5, spacing=-0.1)
    with pytest.raises(ValueError, match="periodic"):
        q.simpson(8, endpoint=False)
    with pytest.raises(ValueError, match="rule must be one of"):
        q.weights(5, "gauss")
    with pytest.raises(GridError, match="x has 4 positions but y has 5"):
        q.cumulative_trapezoid(torch.ones(5), torch.linspace(0, 1, 4))
