"""A GP evaluated at scattered (t, x) points: the conservation law through quadrature weights per
time frame, with no grid_shape (gpytorch, float64 and float32)."""

from __future__ import annotations

import pytest
import torch

import constraint_layers as cl

gpytorch = pytest.importorskip("gpytorch")


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _scattered(dtype, frames=4, per_frame=15, seed=0):
    """Points (t_k, x_j) with x scattered in [0, 1] per frame; Voronoi weights per frame."""
    g = torch.Generator().manual_seed(seed)
    pts, rows = [], []
    n = frames * per_frame
    for k in range(frames):
        x = torch.rand(per_frame, generator=g, dtype=torch.float64)
        t = torch.full((per_frame,), 0.1 + 0.2 * k, dtype=torch.float64)
        pts.append(torch.stack([t, x], -1))
        w = torch.zeros(n, dtype=torch.float64)
        w[k * per_frame : (k + 1) * per_frame] = cl.pointcloud.voronoi_weights(
            x[:, None], (0.0, 1.0)
        )
        rows.append(w)
    return torch.cat(pts).to(dtype), torch.stack(rows)  # (n, 2), (frames, n)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gp_at_scattered_points_conserves_per_frame(dtype, tol):
    g = torch.Generator().manual_seed(1)
    xtr = torch.rand(30, 2, generator=g, dtype=torch.float64).to(dtype)
    ytr = (torch.sin(3 * xtr[:, 1]) * torch.exp(-xtr[:, 0])).to(dtype)
    gp = GP(xtr, ytr).to(dtype).eval()
    pts, W = _scattered(dtype)
    mass = torch.tensor([[0.2], [0.15], [0.1], [0.05]], dtype=torch.float64)  # per frame
    model = cl.wrap(gp, cl.Conservation.integral(mass, weights=W))
    assert model.layout == "points"
    with torch.no_grad(), gpytorch.settings.fast_pred_var(False):
        plain = gp(pts)
        f = model(pts)
    assert isinstance(f, gpytorch.distributions.MultivariateNormal)
    got = W @ f.mean.double()
    torch.testing.assert_close(got, mass[:, 0], rtol=0, atol=tol)
    var, var0 = f.variance.double(), plain.variance.double()
    assert bool((var <= var0 + 10 * tol * var0.max()).all())
    assert float(var.sum()) < float(var0.sum())
    s = f.sample(torch.Size([8])).double()
    assert float((s @ W.T - mass[:, 0]).abs().max()) < 1e3 * tol


def test_gp_point_values_and_bounds():
    xtr = torch.rand(20, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gp = GP(xtr, torch.cos(4 * xtr[:, 1]).double()).double().eval()
    pts, W = _scattered(torch.float64, frames=2, per_frame=10)
    model = cl.wrap(gp, cl.Dirichlet(0.0, points=[0, 10]), cl.Conservation.integral(0.1, weights=W))
    with torch.no_grad():
        f = model(pts)
    assert bool((f.mean[[0, 10]] == 0).all())
    assert float(f.variance[[0, 10]].abs().max()) < 1e-12
    torch.testing.assert_close(W @ f.mean, torch.full((2,), 0.1, dtype=torch.float64))


class SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, inducing):
        dist = gpytorch.variational.CholeskyVariationalDistribution(inducing.shape[0])
        strat = gpytorch.variational.VariationalStrategy(
            self, inducing, dist, learn_inducing_locations=True
        )
        super().__init__(strat)
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_svgp_whole_cloud_holds_minibatches_refused_or_per_batch():
    """Point values hold per minibatch; a total over all points holds only when every point is
    predicted in one call; per-minibatch weights and totals (cl.Given) hold per minibatch."""
    torch.manual_seed(0)
    svgp = SVGP(torch.rand(8, 2, dtype=torch.float64)).double().eval()
    pts, W = _scattered(torch.float64, frames=2, per_frame=12)
    model = cl.wrap(svgp, cl.Conservation.integral(0.3, weights=W))
    with torch.no_grad():
        f = model(pts)
    torch.testing.assert_close(W @ f.mean, torch.full((2,), 0.3, dtype=torch.float64))
    with pytest.raises(ValueError, match="minibatch"):
        with torch.no_grad():
            model(pts[:12])
    per_batch = cl.wrap(svgp, cl.Conservation.integral(cl.Given("mass"), weights=cl.Given("w")))
    with torch.no_grad():
        f = per_batch(pts[:12], w=W[0, :12], mass=torch.tensor(0.1, dtype=torch.float64))
    assert abs(float(W[0, :12] @ f.mean) - 0.1) < 1e-10
    values = cl.wrap(svgp, cl.Dirichlet(0.0, points=[0]))
    with torch.no_grad():
        assert float(values(pts[:5]).mean[0]) == 0.0
