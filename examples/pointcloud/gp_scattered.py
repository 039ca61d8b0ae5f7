"""A GP at scattered (t, x) points, before and after conditioning on the conservation law.

The porous medium equation (``cl.problems.PorousMedium(m)``, closed form) on x in [0, 1]: the
mass ``U(t) = int u(t, x) dx`` is known in closed form. A GP (RBF kernel, hyperparameters fit by
gpytorch's exact marginal likelihood) is trained on noisy values at scattered (t, x) points and
predicts at test points that are scattered in x at a few times t_k. The wrapped GP conditions on
``sum_j w_kj u(t_k, x_j) = U(t_k)`` per frame, with 1D Voronoi weights per frame
(``cl.pointcloud.voronoi_weights``) and no ``grid_shape``.

Reported over data seeds (each seed draws the training and test points and fits the GP; there is
no other training seed), mean and standard error: the conservation error (largest
``|sum_j w_kj mean_j - U(t_k)|``), the mean squared error of the mean against the exact solution,
and the log-likelihood of the exact solution under the predictive marginals (per point).

Run:  python examples/pointcloud/gp_scattered.py [--seeds 0 1 2 ...] [--m 3]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import gpytorch
import torch

import constraint_layers as cl

HERE = Path(__file__).resolve().parent
F64 = torch.float64


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def run(seed: int, m: float, frames=(0.25, 0.5, 0.75, 1.0), per_frame=30, n_train=120) -> dict:
    g = torch.Generator().manual_seed(seed)
    pme = cl.problems.PorousMedium(m)
    xt = torch.rand(n_train, 2, generator=g, dtype=F64)  # (t, x)
    yt = pme.solution(xt[:, 0], xt[:, 1]).to(F64) + 0.01 * torch.randn(
        n_train, generator=g, dtype=F64
    )
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    gp = GP(xt, yt, lik).double()
    gp.train()
    lik.train()
    opt = torch.optim.Adam(gp.parameters(), lr=0.05)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    for _ in range(150):
        opt.zero_grad()
        (-mll(gp(xt), yt)).backward()
        opt.step()
    gp.eval()
    pts, rows = [], []
    n = len(frames) * per_frame
    for k, t in enumerate(frames):
        x = torch.rand(per_frame, generator=g, dtype=F64)
        pts.append(torch.stack([torch.full_like(x, t), x], -1))
        w = torch.zeros(n, dtype=F64)
        w[k * per_frame : (k + 1) * per_frame] = cl.pointcloud.voronoi_weights(
            x[:, None], (0.0, 1.0)
        )
        rows.append(w)
    pts, W = torch.cat(pts), torch.stack(rows)
    mass = pme.mass(torch.tensor(frames, dtype=F64)).to(F64)
    truth = pme.solution(pts[:, 0], pts[:, 1]).to(F64)
    wrapped = cl.wrap(gp, cl.Conservation.integral(mass[:, None], weights=W))
    out = {}
    with torch.no_grad():
        for name, model in (("GP", gp), ("GP + conservation", wrapped)):
            f = model(pts)
            mu = f.mean
            var = f.variance.clamp_min(0) + lik.noise.detach()  # predictive, as observed
            ll = -0.5 * (math.log(2 * math.pi) + var.log() + (truth - mu).square() / var)
            out[name] = {
                "ce": float((W @ mu - mass).abs().max()),
                "mse": float((mu - truth).square().mean()),
                "ll": float(ll.mean()),
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=list(range(5)))
    ap.add_argument("--m", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = [run(s, args.m) for s in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gp_scattered_m{args.m:g}.json").write_text(json.dumps(runs, indent=1))
    print(f"PME m={args.m:g}, {len(runs)} data seeds: mean (standard error)")
    print("| model | max abs CE | MSE | LL per point |")
    print("|---|---|---|---|")
    for name in runs[0]:
        cells = []
        for key in ("ce", "mse", "ll"):
            v = torch.tensor([r[name][key] for r in runs], dtype=F64)
            se = float(v.std() / len(v) ** 0.5)
            cells.append(f"{float(v.mean()):.3g} ({se:.2g})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
