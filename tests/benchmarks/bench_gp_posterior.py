"""Wrapped vs plain gpytorch posterior: mean and variance under no_grad (issue 11, speed).

The setting of issue 11: an ExactGP (Scale x RBF with ARD) on a (t, x) grid, wrapped with
``cl.Conservation.integral(0.0, dim=1, extent=2 pi)`` (zero mass at every time). Plain and wrapped
calls alternate (interleaved), each timed to ``.mean`` and ``.variance``; the table gives the
median times and their ratio wrapped / plain. Not a test (timings depend on the machine)::

    .venv/bin/python tests/benchmarks/bench_gp_posterior.py --threads 1 --repeats 9
    .venv/bin/python tests/benchmarks/bench_gp_posterior.py --profile 4096  # cProfile, float64
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
import statistics
import time

import torch

import constraint_layers as cl

TWO_PI = 2 * math.pi
GRIDS = {640: (20, 32), 4096: (64, 64)}


def make_gp(dtype: torch.dtype, n_train: int):
    import gpytorch

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y):
            super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.RBFKernel(ard_num_dims=2)
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.rand(n_train, generator=g), torch.rand(n_train, generator=g) * TWO_PI])
    x = x.mT.contiguous()
    y = torch.exp(-2 * x[:, 0]) * torch.sin(x[:, 1]) + 0.01 * torch.randn(n_train, generator=g)
    gp = GP(x.to(dtype), y.to(dtype)).to(dtype)
    gp.covar_module.base_kernel.lengthscale = torch.tensor([0.5, 1.5], dtype=dtype)
    gp.likelihood.noise = 1e-2
    return gp.eval()


def points(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    t = torch.linspace(0, 1, shape[0], dtype=dtype)
    x = torch.linspace(0, TWO_PI, shape[1], dtype=dtype)
    return torch.cartesian_prod(t, x)


def call(model, x) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        f = model(x)
        f.mean, f.variance  # noqa: B018  (what a user reads)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", type=int, default=400, help="number of training points")
    ap.add_argument("--profile", type=int, choices=list(GRIDS), default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    mass = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)
    if args.profile:
        gp = make_gp(torch.float64, args.train)
        wrapped = cl.wrap(gp, mass, grid_shape=GRIDS[args.profile])
        x = points(GRIDS[args.profile], torch.float64)
        call(gp, x), call(wrapped, x)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.repeats):
            call(wrapped, x)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
        return
    print(f"threads={args.threads} repeats={args.repeats} training points={args.train}")
    print("| points | dtype | plain (ms) | wrapped (ms) | ratio |")
    print("|---|---|---|---|---|")
    for n, shape in GRIDS.items():
        for dtype in (torch.float32, torch.float64):
            gp = make_gp(dtype, args.train)
            wrapped = cl.wrap(gp, mass, grid_shape=shape)
            x = points(shape, dtype)
            call(gp, x), call(wrapped, x)  # warm caches (gpytorch's prediction strategy)
            plain, wrap = [], []
            for _ in range(args.repeats):
                plain.append(call(gp, x))
                wrap.append(call(wrapped, x))
            p, w = statistics.median(plain), statistics.median(wrap)
            name = str(dtype).replace("torch.", "")
            print(f"| {n} | {name} | {1e3 * p:.1f} | {1e3 * w:.1f} | {w / p:.2f} |")


if __name__ == "__main__":
    main()
