"""A Gaussian process that conserves mass exactly (ProbConserv on the diffusion problem).

The diffusion equation u_t = k u_xx on x in [0, 2 pi] (periodic), u(x, 0) = sin x, has the exact
solution u = exp(-k t) sin x and conserves its total mass: U(t) = integral of u dx = 0 for all t.
A GP fitted to a few noisy observations does not know that; wrapped with
``cl.Conservation.integral(0.0, dim=1)`` its posterior is conditioned on "the mass at every time
is zero": the mean conserves exactly and the uncertainty of the mass vanishes.

Prints CE (conservation error), MSE and LL before and after at t = 0.5, and saves the paper's
"Conservation of mass" figure (total mass over time: unconstrained, constrained, truth) to
``out/conservation_gp.png``.

Run::

    .venv/bin/python examples/conservation_gp.py

References
----------
Hansen, Maddix, Alizadeh, Gupta, Mahoney. Learning Physical Models that Can Respect Conservation
Laws. ICML 2023. arXiv:2302.11002.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import gpytorch
import matplotlib
import torch

import constraint_layers as cl

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TWO_PI = 2 * math.pi
K = 1.0  # diffusivity
N_T, N_X = 21, 64  # evaluation grid (t, x), both ends included
T_STAR = 0.5
torch.set_default_dtype(torch.float64)


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ZeroMean()
        kernel = gpytorch.kernels.RBFKernel(ard_num_dims=2)
        self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def exact(t, x):
    return torch.exp(-K * t) * torch.sin(x)


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    # sparse noisy observations: 8 random times x 5 random positions
    t_obs = torch.rand(8).repeat_interleave(5)
    x_obs = torch.rand(40) * TWO_PI
    train_x = torch.stack([t_obs, x_obs], -1)
    train_y = exact(t_obs, x_obs) + 0.05 * torch.randn(40)

    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    gp = GP(train_x, train_y, likelihood)
    gp.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (-mll(gp(train_x), train_y)).backward()
        opt.step()
    gp.eval()

    # one call: the GP's posterior, conditioned on zero mass at each of the N_T times
    mass = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)
    model = cl.wrap(gp, mass, grid_shape=(N_T, N_X))

    t = torch.linspace(0, 1, N_T)
    x = torch.linspace(0, TWO_PI, N_X)
    grid = torch.cartesian_prod(t, x)  # C order: x fastest
    truth = exact(grid[:, 0], grid[:, 1]).reshape(N_T, N_X)
    with torch.no_grad():
        prior_post, post = gp(grid), model(grid)
        pred = {"GP": likelihood(prior_post), "ProbConserv-GP": likelihood(post)}
        latent = {"GP": prior_post, "ProbConserv-GP": post}

    G, _ = mass.dense((1, 1, N_T, N_X))  # (N_T, N): the quadrature rows, one per time
    i_star = round(T_STAR * (N_T - 1))
    print(f"diffusion u = exp(-{K:g} t) sin x, GP on 40 noisy points; metrics at t = {T_STAR}")
    print(f"{'method':<16} {'CE':>10} {'MSE':>10} {'LL':>8}   max |mass(t)| over t")
    masses, stds = {}, {}
    for name, dist in pred.items():
        mean = dist.mean.reshape(1, 1, N_T, N_X)
        ce = cl.metrics.conservation_error(mean, mass)[0]  # (N_T,)
        mse = cl.metrics.mse(mean[0, 0, i_star], truth[i_star])
        var = dist.variance.reshape(N_T, N_X)[i_star]
        ll = cl.metrics.gaussian_log_likelihood(truth[i_star], mean[0, 0, i_star], var)
        print(
            f"{name:<16} {float(ce[i_star]):>10.2e} {float(mse):>10.2e} {float(ll):>8.3f}"
            f"   {float(ce.abs().max()):.2e}"
        )
        masses[name] = ce  # the total mass (the true mass is 0)
        cov = latent[name].lazy_covariance_matrix
        stds[name] = (G * (cov @ G.mT).mT).sum(-1).clamp_min(0).sqrt()

    out = Path("out")
    out.mkdir(exist_ok=True)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("GP", "tab:orange"), ("ProbConserv-GP", "tab:blue")):
        m, s = masses[name].numpy(), stds[name].numpy()
        ax.plot(t, m, color=color, label=name)
        ax.fill_between(t, m - 2 * s, m + 2 * s, color=color, alpha=0.2)
    ax.plot(t, torch.zeros_like(t), "k--", label="truth")
    ax.set(title="Conservation of mass", xlabel="time t", ylabel=r"total mass $\int u\,dx$")
    ax.legend()
    for name, color in (("GP", "tab:orange"), ("ProbConserv-GP", "tab:blue")):
        m = pred[name].mean.reshape(N_T, N_X)[i_star]
        s = pred[name].variance.reshape(N_T, N_X)[i_star].sqrt()
        ax2.plot(x, m, color=color, label=name)
        ax2.fill_between(x, m - 2 * s, m + 2 * s, color=color, alpha=0.2)
    ax2.plot(x, truth[i_star], "k--", label="truth")
    ax2.set(title=f"solution at t = {T_STAR} (mean, 2 std)", xlabel="x", ylabel="u")
    ax2.legend()
    fig.tight_layout()
    path = out / "conservation_gp.png"
    fig.savefig(path, dpi=120)
    print(f"saved {path} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
