"""Training of the black boxes: the ANP (and SoftC-ANP), a deep ensemble, per-function GPs.

- ANP: the negative ELBO of :meth:`anp.ANP.loss` on context + target points, Adam, mini-batches of
  functions, reshuffled every epoch.
- SoftC-ANP: the same plus ``softc_weight * mean((mass error / L)^2)``: the trapezoid mass of the
  predicted mean on ``softc_points`` uniform x nodes at every target time, against the analytic
  mass (L the domain length). A soft penalty: the mass is not conserved exactly. (The paper's
  SoftC penalises the PDE residual; the mass penalty is the soft form of the very constraint the
  layer enforces, and is well defined for the degenerate Stefan diffusivity.)
- Deep ensemble: ``ens_members`` MLPs over ``(t, x, parameter)`` with a mean and a variance head
  (Gaussian negative log-likelihood; Lakshminarayanan et al., 2017), each from its own
  initialisation and data order, on the same context + target points.
- GP: an exact GP per test function on its 100 context points (constant mean, scaled ARD RBF
  kernel on ``(t, x)`` scaled to [0, 1]^2), hyperparameters by the marginal likelihood.
"""

from __future__ import annotations

import math
import time

import gpytorch
import torch
import torch.nn.functional as F
from anp import ANP
from data import PROBLEMS, Config
from torch import Tensor, nn

import constraint_layers as cl

__all__ = ["GP", "MLPMember", "fit_gp", "train_anp", "train_ensemble"]


# ------------------------------------------------------------------------------------ ANP
def _penalty_points(t: Tensor, n_x: int, domain: tuple[float, float]) -> Tensor:
    """(B, T) target times -> (B, T * n_x, 2) points, time-major, on uniform x nodes."""
    b, nt = t.shape
    x = torch.linspace(*domain, n_x, dtype=t.dtype, device=t.device)
    tt = t[:, :, None].expand(b, nt, n_x)
    xx = x.expand(b, nt, n_x)
    return torch.stack([tt, xx], -1).reshape(b, nt * n_x, 2)


def train_anp(
    problem: str, data, cfg: Config, *, softc: bool = False, seed: int = 0, device="cpu", log=print
) -> tuple[ANP, dict]:
    """Train an ANP (``softc``: with the mass penalty) on the training functions ``data``."""
    cls = PROBLEMS[problem]
    torch.manual_seed(seed)
    model = ANP(cls.t_range, cls.domain, hidden=cfg.hidden, dropout=cfg.dropout).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    cx, cy, tx, ty = (
        v.to(device) for v in (data.context_x, data.context_y, data.target_x, data.target_y)
    )
    tt, tmass = data.target_t.to(device), data.target_mass.to(device)
    n = cx.shape[0]
    length = cls.domain[1] - cls.domain[0]
    weights = None
    if softc:
        weights = cl.quadrature.trapezoid(
            cfg.softc_points, extent=length, dtype=cx.dtype, device=device
        )
    gen = torch.Generator().manual_seed(seed)
    total_steps = cfg.epochs * math.ceil(n / cfg.batch)
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    sched = None
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    elif cfg.lr_schedule != "constant":
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")
    steps, start, history, parts = 0, time.perf_counter(), [], []
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        total, count = 0.0, 0
        for i in range(0, n, cfg.batch):
            idx = perm[i : i + cfg.batch]
            extra = None
            if softc:
                extra = _penalty_points(tt[idx], cfg.softc_points, cls.domain)
            loss, extra_mean = model.loss(cx[idx], cy[idx], tx[idx], ty[idx], extra_x=extra)
            if softc:
                u = extra_mean.reshape(len(idx), tt.shape[1], cfg.softc_points)
                mass_err = (u * weights).sum(-1) - tmass[idx]
                penalty = (mass_err / length).square().mean()
                parts.append((float(loss.detach()), float(penalty.detach())))
                loss = loss + cfg.softc_weight * penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
            steps += 1
            if cfg.max_steps is not None and steps >= cfg.max_steps:
                break
        history.append(total / max(count, 1))
        if cfg.max_steps is not None and steps >= cfg.max_steps:
            break
    seconds = time.perf_counter() - start
    name = "SoftC-ANP" if softc else "ANP"
    info = {"steps": steps, "epochs": len(history), "loss": history, "seconds": seconds}
    msg = f"  {name}: {steps} steps, {len(history)} epochs, loss {history[-1]:.4f}"
    if parts:
        last = parts[-max(1, len(parts) // max(len(history), 1)) :]  # the last epoch
        info["last_epoch_elbo_loss"] = sum(p[0] for p in last) / len(last)
        info["last_epoch_mass_penalty"] = sum(p[1] for p in last) / len(last)
        msg += (
            f" (negative ELBO {info['last_epoch_elbo_loss']:.4f}, mass penalty "
            f"{info['last_epoch_mass_penalty']:.2e})"
        )
    log(f"{msg}, {seconds:.1f} s")
    model.eval()
    return model, info


# ------------------------------------------------------------------------------- ensemble
class MLPMember(nn.Module):
    """One ensemble member: ``(t, x, parameter)`` -> Gaussian ``(mean, variance)`` of ``u``.

    ``forward(features)`` with features of shape (batch, T, X, 3) returns ``(mean, variance)``
    of shape (batch, 1, T, X): a channel-first grid, as :mod:`constraint_layers.adapters` reads
    a ``(mean, variance)`` head.
    """

    def __init__(self, lo: Tensor, width: Tensor, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("lo", lo, persistent=False)  # shape: (3,)
        self.register_buffer("width", width, persistent=False)  # shape: (3,)
        self.net = nn.Sequential(
            nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2),
        )  # fmt: skip

    def gaussian(self, features: Tensor) -> tuple[Tensor, Tensor]:
        out = self.net((features - self.lo) / self.width)
        mean, raw = out.unbind(-1)
        return mean, (F.softplus(raw) + 1e-3).square()

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        mean, var = self.gaussian(features)
        return mean.unsqueeze(1), var.unsqueeze(1)


def _features(x: Tensor, params: Tensor) -> Tensor:
    """(n, P, 2) points and (n,) parameters -> (n, P, 3) features (t, x, parameter)."""
    p = params.to(x.dtype)[:, None, None].expand(*x.shape[:2], 1)
    return torch.cat([x, p], -1)


def train_ensemble(
    problem: str, data, cfg: Config, *, seed: int = 0, device="cpu", log=print
) -> tuple[list[MLPMember], dict]:
    """Train ``cfg.ens_members`` Gaussian MLPs on all context and target points of ``data``."""
    cls = PROBLEMS[problem]
    feats = torch.cat(
        [_features(data.context_x, data.params), _features(data.target_x, data.params)], 1
    ).reshape(-1, 3)
    ys = torch.cat([data.context_y, data.target_y], 1).reshape(-1)
    feats, ys = feats.to(device), ys.to(device)
    lo = torch.tensor([cls.t_range[0], cls.domain[0], cls.TRAIN_RANGE[0]])
    hi = torch.tensor([cls.t_range[1], cls.domain[1], cls.TRAIN_RANGE[1]])
    members, start = [], time.perf_counter()
    steps = cfg.ens_steps if cfg.max_steps is None else min(cfg.ens_steps, cfg.max_steps)
    for k in range(cfg.ens_members):
        torch.manual_seed(seed + 1000 * k)
        member = MLPMember(lo, hi - lo, cfg.ens_width).to(device)
        opt = torch.optim.Adam(member.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        gen = torch.Generator().manual_seed(seed + 1000 * k)
        for _ in range(steps):
            idx = torch.randint(0, feats.shape[0], (cfg.ens_batch,), generator=gen).to(device)
            mean, var = member.gaussian(feats[idx])
            loss = F.gaussian_nll_loss(mean, ys[idx], var, full=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        member.eval()
        members.append(member)
    seconds = time.perf_counter() - start
    log(f"  Ensemble: {cfg.ens_members} members x {steps} steps, {seconds:.1f} s")
    return members, {"steps": steps, "members": cfg.ens_members, "seconds": seconds}


# ------------------------------------------------------------------------------------- GP
class GP(gpytorch.models.ExactGP):
    """Exact GP over ``(t, x)`` (inputs scaled to [0, 1]^2 by the caller)."""

    def __init__(self, x: Tensor, y: Tensor, likelihood) -> None:
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x: Tensor) -> gpytorch.distributions.MultivariateNormal:
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def fit_gp(
    context_x: Tensor, context_y: Tensor, lo: Tensor, width: Tensor, iters: int
) -> tuple[GP, gpytorch.likelihoods.GaussianLikelihood]:
    """Fit one GP to one function's context (``context_x`` (P, 2) raw, ``context_y`` (P,))."""
    x = ((context_x.to(torch.float64) - lo) / width).contiguous()
    y = context_y.to(torch.float64).reshape(-1)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(1e-6)
    ).double()
    gp = GP(x, y, likelihood).double()
    gp.covar_module.base_kernel.lengthscale = 0.3
    gp.likelihood.noise = 1e-4
    gp.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    with gpytorch.settings.cholesky_jitter(1e-6):
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = -mll(gp(x), y)
            loss.backward()
            opt.step()
    gp.eval()
    likelihood.eval()
    return gp, likelihood


def scale_bounds(problem: str) -> tuple[Tensor, Tensor]:
    """``lo`` and ``width`` of ``(t, x)`` for the GP's input scaling (float64)."""
    cls = PROBLEMS[problem]
    lo = torch.tensor([cls.t_range[0], cls.domain[0]], dtype=torch.float64)
    hi = torch.tensor([cls.t_range[1], cls.domain[1]], dtype=torch.float64)
    return lo, hi - lo
