"""The test mixin with bounds: its dense reference (a float64 QP) covers ``cl.Bounds`` (issue 18,
engine)."""

from __future__ import annotations

import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.testing import ConstraintLayerTests, reference_prediction

F64 = torch.float64


class Conv(nn.Module):
    """A deterministic grid model (channel-first)."""

    def __init__(self, ndim: int = 1):
        super().__init__()
        self.net = (nn.Conv1d, nn.Conv2d)[ndim - 1](1, 1, 3, padding=1)

    def forward(self, x):
        return self.net(x) + 0.3


class VarianceHead(nn.Module):
    """(mean, variance) on a grid."""

    def __init__(self):
        super().__init__()
        self.mean = Conv()
        self.logvar = Conv()

    def forward(self, x):
        return self.mean(x), 0.05 + self.logvar(x).exp()


class _ActiveBounds:
    """The bounds must bind (else the reference check says nothing about them)."""

    def test_bounds_are_active(self):
        _model, layer, x = self.build()
        with torch.no_grad():
            g = self.prediction(layer, layer(x))
            eq = [c for c in layer.constraints if c.family != "bounds"]
            plain = self.prediction(layer, layer.base_output(x))
            unbounded, _ = reference_prediction(plain, eq, grid=layer.grid, lift=layer.lift)
        assert not torch.allclose(g.mean.to(F64), unbounded, atol=1e-6)


class TestInsulatedRodNonNegative(_ActiveBounds, ConstraintLayerTests):
    """Neumann walls, the total heat, and no negative value."""

    def make_model(self, dtype):
        return Conv().to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 21, dtype=dtype)

    def make_constraints(self):
        return [cl.Neumann(0.0), cl.Conservation.integral(0.4), cl.Bounds(lower=0.0)]


class TestBoxWithoutWalls(_ActiveBounds, ConstraintLayerTests):
    """A total and two-sided bounds on a 2D grid (the separable path)."""

    def make_model(self, dtype):
        return Conv(2).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 9, 8, dtype=dtype)

    def make_constraints(self):
        return [cl.Conservation.integral(0.2, dim=(0, 1)), cl.Bounds(-0.1, 0.6)]


class TestGaussianWallsMassBounds(_ActiveBounds, ConstraintLayerTests):
    """A (mean, variance) head: Dirichlet walls, the total, a lower bound whose active entries
    are conditioned on (``variance="active"``)."""

    def make_model(self, dtype):
        return VarianceHead().to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 15, dtype=dtype)

    def make_constraints(self):
        return [cl.Dirichlet(0.0), cl.Conservation.integral(0.5), cl.Bounds(0.0, variance="active")]
