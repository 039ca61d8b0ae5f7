"""gpytorch posteriors of wrapped GPs, used the way a gpytorch user uses them (issue 11, 6-14).

Each test builds a tiny GP with fixed hyperparameters (no training) on a (t, x) grid and checks
one promise through gpytorch's own calls: ``sample`` / ``rsample`` / ``log_prob`` / ``entropy``
on what the wrapper returns, under ``gpytorch.settings`` where it matters.
"""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl

gpytorch = pytest.importorskip("gpytorch")

F64, F32 = torch.float64, torch.float32
TWO_PI = 2 * math.pi
TOL = {F64: 1e-12, F32: 1e-5}  # |G s - b| relative to |G| |s|


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood=None):
        super().__init__(x, y, likelihood or gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def grid(n_t, n_x, dtype=F64):
    t = torch.linspace(0, 1, n_t, dtype=dtype)
    x = torch.linspace(0, TWO_PI, n_x, dtype=dtype)
    return torch.cartesian_prod(t, x)  # (t, x) flattened in C order


def make_gp(dtype=F64, lengthscale=(0.5, 1.5), n_obs=12, noise=1e-3, seed=0):
    """Sparse noisy observations of exp(-2 t) sin x; hyperparameters fixed by hand."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.rand(n_obs, generator=g), torch.rand(n_obs, generator=g) * TWO_PI], -1)
    y = torch.exp(-2 * x[:, 0]) * torch.sin(x[:, 1]) + 0.01 * torch.randn(n_obs, generator=g)
    gp = GP(x.to(dtype), y.to(dtype)).to(dtype)
    gp.covar_module.base_kernel.lengthscale = torch.tensor(lengthscale, dtype=dtype)
    gp.covar_module.outputscale = 1.0
    gp.likelihood.noise = noise
    return gp.eval()


MASS = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)  # zero mass at every time


def residual(samples, shape, constraint=MASS):
    """max |G s - b| / (|G| |s| + |b|) over samples of the flat event."""
    G, b = constraint.dense((1, *shape))
    s = samples.double().reshape(-1, G.shape[-1])
    gap = (s @ G.mT - b).abs()
    scale = s.abs() @ G.abs().mT + b.abs()
    return float((gap / scale).max())


# ----------------------------------------------------------------------- 6. exact samples
@pytest.mark.parametrize("dtype", [F64, F32])
def test_gpytorch_sampling_paths_conserve(dtype):
    gp = make_gp(dtype)
    model = cl.wrap(gp, MASS, grid_shape=(5, 8))
    x = grid(5, 8, dtype)
    with torch.no_grad():
        post = model(x)
        assert isinstance(post, gpytorch.distributions.MultivariateNormal)
        draws = {
            "sample": post.sample(torch.Size([16])),
            "rsample": post.rsample(torch.Size([16])),
            "base_samples": post.rsample(base_samples=torch.randn(16, 40, dtype=dtype)),
        }
        with gpytorch.settings.fast_pred_samples():
            draws["fast_pred_samples"] = model(x).rsample(torch.Size([16]))
        plain = gp(x).rsample(torch.Size([16]))
    for name, s in draws.items():
        assert s.shape == (16, 40) and s.dtype == dtype, name
        assert residual(s, (1, 5, 8)) < TOL[dtype], name
    assert residual(plain, (1, 5, 8)) > 1e-3  # the GP's own samples do not conserve
    # the exact root reproduces the conditioned covariance (up to the model root's jitter)
    R = post.lazy_covariance_matrix.root_decomposition().root.to_dense().double()
    S = post.covariance_matrix.double()
    assert float((R @ R.mT - S).abs().max()) < (1e-6 if dtype == F64 else 1e-3)


def test_gradients_flow_through_rsample():
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS, grid_shape=(5, 8))
    s = model(grid(5, 8)).rsample(torch.Size([4]))
    s.square().sum().backward()
    assert gp.covar_module.raw_outputscale.grad is not None
    assert residual(s.detach(), (1, 5, 8)) < TOL[F64]


# ---------------------------------------------------------------------- 7. log_prob, entropy
def subspace_density(mean, cov, G, x):
    """Reference: the density of N(mean, cov) on {G u = G mean} w.r.t. its surface measure, from an
    orthonormal basis Q of null(G): z = Q^T (x - mean) ~ N(0, Q^T cov Q)."""
    m = G.shape[0]
    _, _, Vh = torch.linalg.svd(G)
    Q = Vh[m:].mT  # (N, N - M)
    C = Q.mT @ cov @ Q
    z = (x - mean) @ Q
    L = torch.linalg.cholesky(C)
    logdet = 2 * L.diagonal().log().sum()
    quad = torch.cholesky_solve(z.unsqueeze(-1), L).squeeze(-1).mul(z).sum(-1)
    k = Q.shape[-1]
    logp = -0.5 * (k * math.log(2 * math.pi) + logdet + quad)
    entropy = 0.5 * (k * (1 + math.log(2 * math.pi)) + logdet)
    return logp, entropy


def test_log_prob_is_the_density_on_the_constraint_set():
    gp64, gp32 = make_gp(F64, lengthscale=(0.3, 0.8)), make_gp(F32, lengthscale=(0.3, 0.8))
    shape = (4, 5)
    G, _ = MASS.dense((1, 1, *shape))  # (M, N)
    wrapped64 = cl.wrap(gp64, MASS, grid_shape=shape)
    wrapped32 = cl.wrap(gp32, MASS, grid_shape=shape)
    with torch.no_grad():
        post = wrapped64(grid(*shape))
        x = post.sample(torch.Size([3]))
        ref_lp, ref_h = subspace_density(post.mean, post.covariance_matrix, G, x)
        values = []
        for jitter in (1e-10, 1e-8, 1e-6):  # gpytorch's jitter plays no part
            with gpytorch.settings.cholesky_jitter(jitter, jitter):
                values.append(post.log_prob(x))
        post32 = wrapped32(grid(*shape, F32))
        lp32 = post32.log_prob(x.float())
        off = post.log_prob(gp64(grid(*shape)).mean)  # the unconstrained mean: off the set
    for v in values:
        torch.testing.assert_close(v, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(post.entropy(), ref_h, rtol=1e-6, atol=1e-6)
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])
    assert lp32.dtype == F32 and bool(torch.isfinite(lp32).all())
    torch.testing.assert_close(lp32.double(), ref_lp, rtol=1e-3, atol=1e-2)
    assert float(off) == -math.inf


def test_log_prob_with_constraint_noise_is_the_ordinary_density():
    gp = make_gp(F64, lengthscale=(0.3, 0.8))
    model = cl.wrap(gp, MASS, grid_shape=(4, 5), noise=0.05)
    with torch.no_grad():
        post = model(grid(4, 5))
        x = gp(grid(4, 5)).mean  # off the constraint set: finite, the constraint is soft
        dense = torch.distributions.MultivariateNormal(post.mean, post.covariance_matrix)
        torch.testing.assert_close(post.log_prob(x), dense.log_prob(x), rtol=1e-6, atol=1e-6)
