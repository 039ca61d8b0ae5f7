"""gpytorch GPs, neuraloperator FNO (HardC) and UQNO, wrapped for exact conservation."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import ClassVar

import pytest
import torch

import constraint_layers as cl
from constraint_layers.testing import ConservationLayerTests

gpytorch = pytest.importorskip("gpytorch")
neuralop = pytest.importorskip("neuralop")

F64 = torch.float64
TWO_PI = 2 * math.pi


# ------------------------------------------------------------------------------- gpytorch
class DiffusionGP(gpytorch.models.ExactGP):
    def __init__(self, x, y):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def diffusion_data(k=2.0, n_t=6, n_x=6, dtype=F64, seed=0):
    """Sparse noisy observations of u = exp(-k t) sin x on [0, 1] x [0, 2 pi]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n_t * n_x, generator=g, dtype=dtype)
    x = torch.rand(n_t * n_x, generator=g, dtype=dtype) * TWO_PI
    y = torch.exp(-k * t) * torch.sin(x) + 0.01 * torch.randn(n_t * n_x, generator=g, dtype=dtype)
    return torch.stack([t, x], -1), y


def test_grid(n_t, n_x, dtype=F64):
    t = torch.linspace(0, 1, n_t, dtype=dtype)
    x = torch.linspace(0, TWO_PI, n_x, dtype=dtype)
    return torch.cartesian_prod(t, x)  # C order: (t, x) grid flattened, x fastest


test_grid.__test__ = False  # a helper, not a test


def trained_gp(dtype=F64, steps=40):
    torch.manual_seed(0)
    x, y = diffusion_data(dtype=dtype)
    gp = DiffusionGP(x, y).to(dtype)
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        (-mll(gp(x), y)).backward()
        opt.step()
    return gp.eval()


def test_exact_gp_conserves_mass_exactly():
    gp = trained_gp()
    n_t, n_x = 11, 41
    mass = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)  # zero mass at every t
    model = cl.wrap(gp, mass, grid_shape=(n_t, n_x))
    assert cl.unwrap(model) is gp
    pts = test_grid(n_t, n_x)
    with torch.no_grad():
        before, after = gp(pts), model(pts)
    assert isinstance(after, gpytorch.distributions.MultivariateNormal)
    # the covariance stays lazy: the model's operator minus a rank-M root
    from linear_operator.operators import LinearOperator

    assert isinstance(after.lazy_covariance_matrix, LinearOperator)
    ce_before = cl.metrics.conservation_error(before.mean.reshape(1, 1, n_t, n_x), mass)
    ce_after = cl.metrics.conservation_error(after.mean.reshape(1, 1, n_t, n_x), mass)
    assert float(ce_before.abs().max()) > 1e-3  # the GP alone does not conserve
    assert float(ce_after.abs().max()) < 1e-12  # exactly, to float64 rounding
    G, _ = mass.dense((1, 1, n_t, n_x))
    with torch.no_grad():
        S = after.covariance_matrix
    assert float((G @ S @ G.mT).abs().max()) < 1e-10  # no uncertainty left in the mass
    assert bool((after.variance <= before.variance + 1e-12).all())
    truth = torch.exp(-2.0 * pts[:, 0]) * torch.sin(pts[:, 1])
    assert cl.metrics.mse(after.mean, truth, dim=None) <= cl.metrics.mse(
        before.mean, truth, dim=None
    )
    with torch.no_grad():  # the likelihood still applies to the constrained posterior
        pred = gp.likelihood(model(pts))
    torch.testing.assert_close(pred.mean, after.mean)


def test_approximate_gp_and_batch_gp():
    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, z):
            dist = gpytorch.variational.CholeskyVariationalDistribution(z.shape[0])
            strat = gpytorch.variational.VariationalStrategy(
                self, z, dist, learn_inducing_locations=True
            )
            super().__init__(strat)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.RBFKernel()

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    torch.manual_seed(0)
    gp = SVGP(torch.linspace(0, 1, 6, dtype=F64).unsqueeze(-1)).to(F64).eval()
    model = cl.wrap(gp, cl.Conservation.integral(0.25))
    with torch.no_grad():
        f = model(torch.linspace(0, 1, 30, dtype=F64).unsqueeze(-1))
    assert abs(float(cl.quadrature.trapezoid(30) @ f.mean) - 0.25) < 1e-12
    with pytest.raises(TypeError, match="MultivariateNormal"):
        model.adapter.read(torch.zeros(3))


class TestExactGPMixin(ConservationLayerTests):
    """The mixin's checks on a GP (flat event on a (t, x) grid; no batch axis)."""

    batched = False
    layer_options: ClassVar[dict] = {"grid_shape": (3, 5)}

    def make_model(self, dtype):
        x, y = diffusion_data(dtype=dtype, n_t=4, n_x=4)
        gp = DiffusionGP(x, y).to(dtype)
        gp.covar_module.base_kernel.lengthscale = 1.0
        return gp.eval()

    def make_constraints(self):
        return cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)

    def make_input(self, batch, dtype):
        return test_grid(3, 5, dtype)

    def reference(self, model, x):
        f = model(x)
        G, b = self.dense_rows(f.mean.shape, x, event_ndim=1)
        mean, cov = self.dense_update(
            f.mean.unsqueeze(0), G, b, covariance=f.covariance_matrix.unsqueeze(0)
        )
        return mean[0], cov[0].diagonal()


# ---------------------------------------------------------------------------- neuralop
def fno():
    from neuralop.models import FNO

    return FNO(n_modes=(8,), in_channels=1, out_channels=1, hidden_channels=8, n_layers=2)


class TestFNOHardC(ConservationLayerTests):
    """A deterministic FNO: the Euclidean projection (float32: spectral convolutions)."""

    dtype = torch.float32
    check_gradients = False  # neuraloperator computes in complex64 whatever the dtype
    check_float32 = False  # the main checks run in float32

    def make_model(self, dtype):
        return fno()

    def make_constraints(self):
        return cl.Conservation.integral(1.0, extent=TWO_PI)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 32)

    def reference(self, model, x):
        y = model(x)
        G, b = self.dense_rows(y.shape, x)
        mean, _ = self.dense_update(y.reshape(y.shape[0], -1), G, b)
        return mean.reshape(y.shape), None

    def test_adapter_and_checkpoint(self):
        _model, layer, _x = self.build()
        assert layer.adapter.name == "neuraloperator"
        sd = layer.state_dict()
        assert all(k.startswith("model.") for k in sd) and "_metadata" not in sd


@pytest.mark.filterwarnings("ignore:Attempting to update metadata:UserWarning")
class TestUQNO(ConservationLayerTests):
    """UQNO's (solution, quantile) band read as a Gaussian; the band comes back conditioned."""

    dtype = torch.float32
    check_gradients = False  # UQNO computes its solution under no_grad
    check_float32 = False

    def make_model(self, dtype):
        from neuralop.models import UQNO

        return UQNO(fno())

    def make_constraints(self):
        return cl.Conservation.integral(0.5)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 32)

    def reference(self, model, x):
        u, band = model(x)
        z = 1.6448536269514722  # coverage 0.9
        G, b = self.dense_rows(u.shape, x)
        mean, cov = self.dense_update(
            u.reshape(u.shape[0], -1), G, b, variance=(band / z).square().reshape(u.shape[0], -1)
        )
        return mean.reshape(u.shape), cov.diagonal(dim1=-2, dim2=-1).reshape(u.shape)

    def test_band_round_trip(self):
        from constraint_layers.adapters.uqno import UQNOAdapter

        model, _, x = self.build()
        layer = cl.ConservationProjection(
            model, self.make_constraints(), adapter=UQNOAdapter(0.95, 2.0)
        )
        with torch.no_grad():
            _u, band = layer(x)
            _u0, band0 = model(x)
        assert bool((band <= band0.abs() * (1 + 1e-6)).all())  # conditioning narrows the band
        assert abs(layer.adapter.z - 1.959963984540054) < 1e-12
        with pytest.raises(ValueError, match="coverage"):
            UQNOAdapter(coverage=1.5)


def test_import_does_not_pull_third_party_libraries():
    code = (
        "import sys, constraint_layers as cl; "
        "cl.wrap(__import__('torch').nn.Linear(2, 2), cl.Conservation.integral(0.0)); "
        "bad = [m for m in ('gpytorch', 'neuralop', 'linear_operator') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
