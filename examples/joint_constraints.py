"""Boundary conditions and conservation together: one ``cl.wrap``, every row exact.

Two experiments, each comparing the joint wrapper with one family alone and with the two
wrappers nested (the only option before the joint engine):

(a) Heat in an insulated rod. ``u_t = k u_xx`` on [0, 1] with both walls insulated (the problem
    suite's :class:`~constraint_layers.problems.Heat` with heater amplitude ``U = 0``), learned as
    the single step ``u0 -> u(., 0.5)`` by a neuraloperator FNO. The total heat is conserved: the
    constraint value is each sample's own total (``cl.Given("total")``, see "Data" below). Six
    models, same data, same budget, same seeds (same initial weights and batch order), each
    trained end to end with its constraint in place:

    - ``plain``: the FNO;
    - ``boundary``: ``cl.wrap(fno, neumann)``;
    - ``conservation``: ``cl.wrap(fno, total)``;
    - ``seq_bc``: ``cl.wrap(cl.wrap(fno, neumann), total)`` (walls, then total);
    - ``seq_cb``: ``cl.wrap(cl.wrap(fno, total), neumann)`` (total, then walls);
    - ``joint``: ``cl.wrap(fno, neumann, total)``.

    Reported per model (mean and standard error over training seeds): the boundary error (largest
    ``|du/dn|`` at either wall over the test set, the condition's 2nd-order one-sided stencil),
    the conservation error (largest ``|trapezoid(u) - total|``) and the relative L2 error.

(b) A Gaussian process of the diffusion problem ``u = exp(-t) sin x`` on ``x in [0, 2 pi]``,
    ``t in [0, 1]`` (:class:`~constraint_layers.problems.Diffusion`, ``k = 1``), fitted to 40
    noisy observations (gpytorch ExactGP over flattened ``(t, x)`` points), evaluated on a
    ``(t, x)`` grid: the walls ``u(t, 0) = u(t, 2 pi) = 0`` (``cl.Dirichlet(0.0, dim=1)``) and zero
    total mass at every time (``cl.Conservation.integral(0.0, dim=1)``). Models: the plain GP,
    walls only, mass only, joint, and the two nested orders. Reported: CE (largest ``|mass(t)|``
    over the times), wall error (largest ``|mean|`` at the walls), wall variance (largest
    posterior variance at the walls), MSE and LL at ``t = 0.5`` (LL of the truth under the
    predictive distribution, observation noise included).

Data
----
With ``U = 0`` the continuous total heat is ``sinc(omega)`` at every time. The data's own
trapezoid totals agree with it to float32 rounding (the data are float32), but the trapezoid total
of the INPUT ``u0 = cos(omega pi x)`` does not (``u0`` is not insulated at x = 1, so the
trapezoid rule errs by O(h^2)): the total is therefore supplied per sample with the call
(``model(x, total=...)``), the data's own trapezoid total of ``u(., 0.5)``, computed in float64.
The script prints and stores these checks.

Run::

    .venv/bin/python examples/joint_constraints.py                 # --quick: minutes on 2 cores
    .venv/bin/python examples/joint_constraints.py --seeds 0 1 2 3 4
    .venv/bin/python examples/joint_constraints.py --smoke         # seconds: checks the pipeline

Writes ``out/joint_constraints/results.json`` and the figures ``heat_walls.png``,
``heat_errors.png`` and ``gp_band.png`` there, and prints both tables as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import constraint_layers as cl

EXPERIMENT = "joint_constraints"
T_END = 0.5  # the heat step u0 -> u(., T_END)
TWO_PI = 2 * math.pi

HEAT_MODELS = ("plain", "boundary", "conservation", "seq_bc", "seq_cb", "joint")
HEAT_LABELS = {
    "plain": "plain FNO",
    "boundary": "boundary only: wrap(fno, neumann)",
    "conservation": "conservation only: wrap(fno, total)",
    "seq_bc": "sequential: wrap(wrap(fno, neumann), total)",
    "seq_cb": "sequential: wrap(wrap(fno, total), neumann)",
    "joint": "joint: wrap(fno, neumann, total)",
}
GP_MODELS = ("plain", "walls", "mass", "joint", "seq_wm", "seq_mw")
GP_LABELS = {
    "plain": "plain GP",
    "walls": "walls only: wrap(gp, walls)",
    "mass": "mass only: wrap(gp, mass)",
    "joint": "joint: wrap(gp, walls, mass)",
    "seq_wm": "sequential: wrap(wrap(gp, walls), mass)",
    "seq_mw": "sequential: wrap(wrap(gp, mass), walls)",
}


# ------------------------------------------------------------------------------- settings
@dataclass
class HeatConfig:
    """Sizes and training budget of the heat experiment (the same for every model)."""

    n_train: int = 200
    n_test: int = 50
    resolution: int = 128
    modes: int = 16
    width: int = 32
    epochs: int = 30
    batch: int = 20
    lr: float = 3e-3
    weight_decay: float = 1e-4
    #: at most this many optimiser steps per epoch (None: every batch)
    max_batches: int | None = None


@dataclass
class GPConfig:
    """Sizes of the GP experiment."""

    n_obs_times: int = 8
    n_obs_per_time: int = 5
    noise: float = 0.05
    steps: int = 100
    lr: float = 0.1
    n_t: int = 21
    n_x: int = 64
    t_star: float = 0.5


SIZES = {
    "quick": (HeatConfig(), GPConfig()),
    "smoke": (
        HeatConfig(
            n_train=4, n_test=2, resolution=33, modes=8, width=8, epochs=1, batch=2, max_batches=2
        ),
        GPConfig(steps=5, n_t=5, n_x=17),
    ),
}


# --------------------------------------------------------------------------------- stats
def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    vals = [float(v) for v in values]
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return m, se


def summarise(runs: list[dict], keys: Sequence[str]) -> dict:
    """Mean and standard error over seeds of each key of ``runs``."""
    out = {}
    for key in keys:
        m, se = mean_se([r[key] for r in runs])
        out[f"{key}_mean"], out[f"{key}_se"] = m, se
    return out


# ----------------------------------------------------------------------------- (a) heat
def heat_constraints() -> tuple[Any, Any]:
    """The insulated walls (outward flux 0 at both ends) and the per-sample total heat."""
    neumann = cl.Neumann(0.0, dim=0)  # side="both", 2nd-order one-sided stencil
    total = cl.Conservation.integral(cl.Given("total"), dim=0)  # trapezoid over [0, 1]
    return neumann, total


def heat_data(cfg: HeatConfig) -> dict:
    """Insulated-rod data (``Heat(flux_amplitude=0)``, data seed 0) and their checks.

    Returns
    -------
    dict
        ``x_train, y_train, total_train, x_test, y_test, total_test`` (float32; totals of shape
        (n, 1)) and ``checks`` (floats: how conservative the data are).
    """
    problem = cl.problems.Heat(flux_amplitude=0.0, t_final=T_END)
    data = problem.generate(
        cfg.n_train + cfg.n_test,
        task="single",
        resolution=cfg.resolution,
        coords=True,
        seed=0,
        cache=False,
        threads=1,
    )
    neumann, _ = heat_constraints()
    trapezoid = cl.Conservation.integral(0.0, dim=0)
    # the data's own total: trapezoid rule of u(., T_END), computed in float64
    total = cl.metrics.conservation_error(data.y.double(), trapezoid)  # (n, 1)
    exact = torch.sinc(data.params["omega"]).reshape(-1, 1)  # the continuous total heat
    total_input = cl.metrics.conservation_error(data.x[:, :1].double(), trapezoid)
    checks = {
        "max_abs_total": float(total.abs().max()),
        "data_total_vs_sinc_omega": float((total - exact).abs().max()),
        "input_total_vs_sinc_omega": float((total_input - exact).abs().max()),
        "data_boundary_error": float(cl.metrics.boundary_error(data.y, [neumann])[0]),
        "data_dtype": str(data.y.dtype),
    }
    x, y, total = data.x.float(), data.y.float(), total.float()
    n = cfg.n_train
    return {
        "x_train": x[:n],
        "y_train": y[:n],
        "total_train": total[:n],
        "x_test": x[n:],
        "y_test": y[n:],
        "total_test": total[n:],
        "grid": data.coords["x"].float(),
        "checks": checks,
    }


def build_heat_model(kind: str, cfg: HeatConfig, in_channels: int, seed: int) -> nn.Module:
    """The model ``kind`` (one of :data:`HEAT_MODELS`); the FNO inside is initialised from
    ``seed``, so every kind starts from the same weights."""
    from neuralop.models import FNO

    torch.manual_seed(seed)
    fno = FNO(
        n_modes=(cfg.modes,),
        in_channels=in_channels,
        out_channels=1,
        hidden_channels=cfg.width,
        positional_embedding=None,  # the input carries the coordinate channel
    )
    neumann, total = heat_constraints()
    if kind == "plain":
        return fno
    if kind == "boundary":
        return cl.wrap(fno, neumann)
    if kind == "conservation":
        return cl.wrap(fno, total)
    if kind == "seq_bc":
        return cl.wrap(cl.wrap(fno, neumann), total)
    if kind == "seq_cb":
        return cl.wrap(cl.wrap(fno, total), neumann)
    if kind == "joint":
        return cl.wrap(fno, neumann, total)
    raise ValueError(f"build_heat_model: unknown model {kind!r}; expected one of {HEAT_MODELS}.")


def call_heat(model: nn.Module, kind: str, x: Tensor, total: Tensor) -> Tensor:
    """Call a heat model; the models with the conservation constraint receive ``total=``."""
    if kind in ("plain", "boundary"):
        return model(x)
    return model(x, total=total)


def train_heat(model: nn.Module, kind: str, data: dict, cfg: HeatConfig, seed: int) -> dict:
    """Adam with step decay on the relative L2 loss of the constrained output.

    The batch order comes from ``seed`` (the same for every model). Returns the loss per epoch
    and the median seconds per epoch.
    """
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.5)
    gen = torch.Generator().manual_seed(seed)
    x, y, total = data["x_train"], data["y_train"], data["total_train"]
    losses, seconds = [], []
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(x), generator=gen)
        start = time.perf_counter()
        run, count = 0.0, 0
        for i, lo in enumerate(range(0, len(x), cfg.batch)):
            if cfg.max_batches is not None and i >= cfg.max_batches:
                break
            idx = perm[lo : lo + cfg.batch]
            opt.zero_grad(set_to_none=True)
            loss = cl.metrics.relative_l2(call_heat(model, kind, x[idx], total[idx]), y[idx])
            loss.backward()
            opt.step()
            run += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        seconds.append(time.perf_counter() - start)
        losses.append(run / max(count, 1))
    return {"train_loss": losses, "s_per_epoch": statistics.median(seconds)}


def heat_errors(pred: Tensor, y: Tensor, total: Tensor) -> dict:
    """Boundary error, conservation error (both: largest absolute over the test set) and the
    relative L2 error (mean over the test set) of ``pred``."""
    neumann, _ = heat_constraints()
    trapezoid = cl.Conservation.integral(0.0, dim=0)
    ce = cl.metrics.conservation_error(pred, trapezoid) - total.double()
    return {
        "boundary_error": float(cl.metrics.boundary_error(pred, [neumann])[0]),
        "conservation_error": float(ce.abs().max()),
        "rel_l2": float(cl.metrics.relative_l2(pred, y)),
    }


def run_heat(cfg: HeatConfig, seeds: Sequence[int], log=print) -> tuple[dict, dict]:
    """Train and evaluate every heat model for every seed.

    Returns
    -------
    (dict, dict)
        The results (data checks, per-seed runs and summaries) and the first seed's test
        predictions per model (for the figures).
    """
    data = heat_data(cfg)
    c = data["checks"]
    log(
        "heat data: trapezoid total of u(., 0.5) vs sinc(omega): "
        f"{c['data_total_vs_sinc_omega']:.2e} ({c['data_dtype']}); trapezoid total of the "
        f"input u0 vs sinc(omega): {c['input_total_vs_sinc_omega']:.2e}; the data's own "
        f"flux at the walls (stencil): {c['data_boundary_error']:.3g}"
    )
    in_channels = int(data["x_train"].shape[1])
    runs: dict[str, list[dict]] = {k: [] for k in HEAT_MODELS}
    preds: dict[str, Tensor] = {}
    for seed in seeds:  # seeds outside, models inside: machine load hits every model alike
        for kind in HEAT_MODELS:
            model = build_heat_model(kind, cfg, in_channels, seed)
            fit = train_heat(model, kind, data, cfg, seed)
            model.eval()
            with torch.no_grad():
                pred = call_heat(model, kind, data["x_test"], data["total_test"])
            res = {"seed": seed, **heat_errors(pred, data["y_test"], data["total_test"]), **fit}
            runs[kind].append(res)
            if seed == seeds[0]:
                preds[kind] = pred
            log(
                f"  heat seed {seed} {kind:12s} rel L2 {res['rel_l2']:.4f}  boundary "
                f"{res['boundary_error']:.2e}  conservation {res['conservation_error']:.2e}  "
                f"{res['s_per_epoch']:.3f} s/epoch"
            )
    keys = ("boundary_error", "conservation_error", "rel_l2", "s_per_epoch")
    models = {
        k: {"label": HEAT_LABELS[k], **summarise(r, keys), "runs": r} for k, r in runs.items()
    }
    truth = heat_errors(data["y_test"], data["y_test"], data["total_test"])
    results = {"config": asdict(cfg), "data_checks": c, "truth": truth, "models": models}
    preds["truth"] = data["y_test"]
    preds["grid"] = data["grid"]
    return results, preds


# ------------------------------------------------------------------------------- (b) GP
def _gp_class():
    import gpytorch

    class FieldGP(gpytorch.models.ExactGP):
        """Zero-mean ExactGP with a scaled RBF kernel over (t, x) points."""

        def __init__(self, x: Tensor, y: Tensor, likelihood: Any) -> None:
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            kernel = gpytorch.kernels.RBFKernel(ard_num_dims=2)
            self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

        def forward(self, x: Tensor) -> Any:
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    return FieldGP


def gp_constraints() -> tuple[Any, Any]:
    """The walls ``u = 0`` at both ends of x and zero mass at every time, on a (t, x) grid."""
    walls = cl.Dirichlet(0.0, dim=1)
    mass = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)
    return walls, mass


def fit_gp(cfg: GPConfig, seed: int) -> tuple[Any, Any, Tensor, Tensor]:
    """Noisy observations of the diffusion solution drawn from ``seed`` and a GP fitted to them
    (float64; Adam on the exact marginal likelihood). Returns (gp, likelihood, points, values)."""
    import gpytorch

    problem = cl.problems.Diffusion(1.0)
    gen = torch.Generator().manual_seed(seed)
    n = cfg.n_obs_times * cfg.n_obs_per_time
    t_obs = torch.rand(cfg.n_obs_times, generator=gen, dtype=torch.float64)
    t_obs = t_obs.repeat_interleave(cfg.n_obs_per_time)
    x_obs = TWO_PI * torch.rand(n, generator=gen, dtype=torch.float64)
    points = torch.stack([t_obs, x_obs], -1)
    noise = cfg.noise * torch.randn(n, generator=gen, dtype=torch.float64)
    values = problem.solution(t_obs, x_obs).to(torch.float64) + noise
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    gp = _gp_class()(points, values, likelihood).double()
    gp.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, gp)
    opt = torch.optim.Adam(gp.parameters(), lr=cfg.lr)
    for _ in range(cfg.steps):
        opt.zero_grad()
        (-mll(gp(points), values)).backward()
        opt.step()
    gp.eval()
    likelihood.eval()
    return gp, likelihood, points, values


def build_gp_model(kind: str, gp: nn.Module, grid_shape: tuple[int, int]) -> nn.Module:
    """The GP model ``kind`` (one of :data:`GP_MODELS`) around the fitted ``gp``."""
    walls, mass = gp_constraints()
    opts = {"grid_shape": grid_shape}
    if kind == "plain":
        return gp
    if kind == "walls":
        return cl.wrap(gp, walls, **opts)
    if kind == "mass":
        return cl.wrap(gp, mass, **opts)
    if kind == "joint":
        return cl.wrap(gp, walls, mass, **opts)
    if kind == "seq_wm":
        return cl.wrap(cl.wrap(gp, walls, **opts), mass, **opts)
    if kind == "seq_mw":
        return cl.wrap(cl.wrap(gp, mass, **opts), walls, **opts)
    raise ValueError(f"build_gp_model: unknown model {kind!r}; expected one of {GP_MODELS}.")


def latent_variance(post: Any) -> Tensor:
    """The posterior marginal variances as computed, clamped at 0.

    gpytorch's ``.variance`` rounds values below 1e-10 up to 1e-10 with a warning; the zeros at
    Dirichlet nodes come out of the diagonal as rounding-size numbers of either sign. The nested
    wrappers return a ``torch.distributions.MultivariateNormal`` (read by the generic adapter).
    """
    lazy = getattr(post, "lazy_covariance_matrix", None)  # gpytorch; torch's: .variance
    var = post.variance if lazy is None else lazy.diagonal(dim1=-2, dim2=-1)
    return var.detach().clamp_min(0.0)


def gp_errors(post: Any, likelihood: Any, truth: Tensor, cfg: GPConfig) -> dict:
    """CE, wall error, wall variance, MSE and LL (at ``cfg.t_star``) of one posterior."""
    walls, mass = gp_constraints()
    mean = post.mean.detach().reshape(1, 1, cfg.n_t, cfg.n_x)
    var = latent_variance(post).reshape(cfg.n_t, cfg.n_x)
    i = round(cfg.t_star * (cfg.n_t - 1))
    ce = cl.metrics.conservation_error(mean, mass)[0]  # (n_t,): the total mass at each time
    # the predictive distribution (observation noise added) for the LL, as in the paper
    pred_var = var + likelihood.noise.detach().reshape(())
    return {
        "ce": float(ce.abs().max()),
        "ce_t_star": float(ce[i].abs()),
        "wall_error": float(cl.metrics.boundary_error(mean, [walls])[0]),
        "wall_var": float(var[:, [0, -1]].max()),
        "mse": float(cl.metrics.mse(mean[0, 0, i], truth[i])),
        "ll": float(cl.metrics.gaussian_log_likelihood(truth[i], mean[0, 0, i], pred_var[i])),
    }


def run_gp(cfg: GPConfig, seeds: Sequence[int], log=print) -> tuple[dict, dict]:
    """Fit one GP per seed (its own observations), wrap it every way, evaluate.

    Returns
    -------
    (dict, dict)
        The results and the first seed's posteriors (mean, latent std, mass per time) per model,
        with the truth and observations, for the figure.
    """
    problem = cl.problems.Diffusion(1.0)
    t = torch.linspace(0.0, 1.0, cfg.n_t, dtype=torch.float64)
    x = torch.linspace(0.0, TWO_PI, cfg.n_x, dtype=torch.float64)
    points = torch.cartesian_prod(t, x)  # C order: x fastest, grid (n_t, n_x)
    truth = problem.solution(points[:, 0], points[:, 1]).reshape(cfg.n_t, cfg.n_x)
    truth = truth.to(torch.float64)
    _, mass = gp_constraints()
    runs: dict[str, list[dict]] = {k: [] for k in GP_MODELS}
    curves: dict[str, Any] = {}
    for seed in seeds:
        start = time.perf_counter()
        gp, likelihood, obs_points, obs_values = fit_gp(cfg, seed)
        fit_seconds = time.perf_counter() - start
        for kind in GP_MODELS:
            model = build_gp_model(kind, gp, (cfg.n_t, cfg.n_x))
            start = time.perf_counter()
            with torch.no_grad(), warnings.catch_warnings():
                # gpytorch warns when it rounds the (exactly zero) wall variances
                warnings.simplefilter("ignore")
                post = model(points)
                res = gp_errors(post, likelihood, truth, cfg)
            res.update(seed=seed, seconds=time.perf_counter() - start, fit_seconds=fit_seconds)
            runs[kind].append(res)
            if seed == seeds[0]:
                mean = post.mean.detach().reshape(cfg.n_t, cfg.n_x)
                curves[kind] = {
                    "mean": mean,
                    "std": latent_variance(post).reshape(cfg.n_t, cfg.n_x).sqrt(),
                    "mass": cl.metrics.conservation_error(mean.reshape(1, 1, *mean.shape), mass)[0],
                }
            log(
                f"  gp seed {seed} {kind:7s} CE {res['ce']:.2e}  wall {res['wall_error']:.2e}  "
                f"wall var {res['wall_var']:.1e}  MSE {res['mse']:.2e}  LL {res['ll']:.3f}"
            )
        if seed == seeds[0]:
            curves["observations"] = (obs_points, obs_values)
    keys = ("ce", "wall_error", "wall_var", "mse", "ll", "seconds")
    models = {k: {"label": GP_LABELS[k], **summarise(r, keys), "runs": r} for k, r in runs.items()}
    curves.update(truth=truth, t=t, x=x)
    return {"config": asdict(cfg), "models": models}, curves


# ------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STYLES = {
    "plain": ("C3", "o", "--"),
    "boundary": ("C1", "v", "-"),
    "conservation": ("C2", "^", "-"),
    "seq_bc": ("C4", "s", ":"),
    "seq_cb": ("C5", "D", ":"),
    "joint": ("C0", "*", "-"),
}


def heat_figures(results: dict, preds: dict, out_dir: Path) -> list[str]:
    """``heat_walls.png``: one test sample next to each wall; ``heat_errors.png``: boundary vs
    conservation error of every model and seed."""
    plt = _plt()
    grid, truth = preds["grid"], preds["truth"]
    neumann, _ = heat_constraints()
    # the test sample where the plain FNO leaks most through a wall
    res = cl.functional.boundary_residuals(preds["plain"], [neumann])[0]
    i = int(torch.stack([r.abs().reshape(r.shape[0], -1).amax(-1) for r in res]).amax(0).argmax())
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    k = 6
    for ax, sl, title in ((axes[0], slice(0, k), "x = 0"), (axes[1], slice(-k, None), "x = 1")):
        ax.plot(grid[sl], truth[i, 0, sl], "k-", lw=2.5, label="truth")
        for kind in HEAT_MODELS:
            color, marker, ls = STYLES[kind]
            ax.plot(grid[sl], preds[kind][i, 0, sl], color=color, marker=marker, ls=ls, ms=5,
                    label=kind)  # fmt: skip
        ax.set(title=f"test sample {i}: insulated wall at {title}", xlabel="x", ylabel="u")
    axes[0].legend(fontsize=7)
    ax = axes[2]
    ax.plot(grid, truth[i, 0], "k-", lw=2.5, label="truth")
    for kind in HEAT_MODELS:
        color, _, ls = STYLES[kind]
        ax.plot(grid, preds[kind][i, 0], color=color, ls=ls, lw=1.2, label=HEAT_LABELS[kind])
    ax.set(title="u(x, 0.5), seed 0 models", xlabel="x")
    ax.legend(fontsize=6)
    fig.suptitle("Insulated rod: Neumann 0 at both walls and the total heat, trained end to end")
    fig.tight_layout()
    names = ["heat_walls.png"]
    fig.savefig(out_dir / names[0], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(10, 4.8))
    floor = 1e-10  # exact zeros drawn at the floor of the log axes
    for kind, r in results["models"].items():
        color, marker, _ = STYLES[kind]
        b = [max(run["boundary_error"], floor) for run in r["runs"]]
        c = [max(run["conservation_error"], floor) for run in r["runs"]]
        ax.scatter(b, c, color=color, marker=marker, s=60, label=HEAT_LABELS[kind])
    t = results["truth"]
    ax.scatter([t["boundary_error"]], [max(t["conservation_error"], floor)], color="k",
               marker="x", s=60, label="the data itself")  # fmt: skip
    ax.set(xscale="log", yscale="log", xlabel="boundary error max |du/dn| (stencil)",
           ylabel="conservation error max |total - given|")  # fmt: skip
    ax.set_title("Every row at once: only the joint wrapper is exact in both", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    names.append("heat_errors.png")
    fig.savefig(out_dir / names[1], dpi=120)
    plt.close(fig)
    return names


def gp_figure(curves: dict, cfg: GPConfig, out_dir: Path) -> list[str]:
    """``gp_band.png``: the posterior band at ``t_star`` for the plain GP, walls only, mass only
    and joint, and the total mass over time."""
    plt = _plt()
    i = round(cfg.t_star * (cfg.n_t - 1))
    x, t, truth = curves["x"], curves["t"], curves["truth"]
    fig, axes = plt.subplots(1, 5, figsize=(22, 3.9))
    obs_points, obs_values = curves["observations"]
    for ax, kind in zip(axes, ("plain", "walls", "mass", "joint")):
        m, s = curves[kind]["mean"][i], curves[kind]["std"][i]
        ax.fill_between(x, m - 2 * s, m + 2 * s, color="C0", alpha=0.25, label="mean +- 2 std")
        ax.plot(x, m, "C0-", label="posterior mean")
        ax.plot(x, truth[i], "k--", label="truth")
        near = (obs_points[:, 0] - t[i]).abs() < 0.1
        ax.plot(obs_points[near, 1], obs_values[near], "k.", label="observations |t - t*| < 0.1")
        ax.set(title=f"{GP_LABELS[kind]}\nt = {float(t[i]):.2f}", xlabel="x")
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.axvline(TWO_PI, color="grey", lw=0.8)
    axes[0].set_ylabel("u")
    axes[0].legend(fontsize=7, loc="lower left")
    ax = axes[4]
    for kind, color in (("plain", "C3"), ("walls", "C1"), ("mass", "C2"), ("joint", "C0")):
        ax.plot(t, curves[kind]["mass"], color=color, label=kind)
    ax.axhline(0.0, color="k", ls="--", lw=1, label="truth")
    ax.set(title="total mass of the mean", xlabel="t", ylabel=r"$\int u\,dx$")
    ax.legend(fontsize=7)
    fig.suptitle("GP of diffusion between walls u = 0 with zero mass: the joint band closes at "
                 "the walls and its mass is exact")  # fmt: skip
    fig.tight_layout()
    fig.savefig(out_dir / "gp_band.png", dpi=110)
    plt.close(fig)
    return ["gp_band.png"]


# ------------------------------------------------------------------------------ reports
def _sci(m: float, se: float) -> str:
    return f"{m:.2e} ({se:.1e})"


def heat_table(results: dict) -> str:
    """The heat results as a markdown table."""
    lines = [
        "| model | boundary error | conservation error | relative L2 | s/epoch |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["models"].values():
        lines.append(
            f"| {r['label']} | {_sci(r['boundary_error_mean'], r['boundary_error_se'])} | "
            f"{_sci(r['conservation_error_mean'], r['conservation_error_se'])} | "
            f"{r['rel_l2_mean']:.4f} ({r['rel_l2_se']:.4f}) | {r['s_per_epoch_mean']:.3f} |"
        )
    t = results["truth"]
    lines.append(
        f"| the data itself | {t['boundary_error']:.2e} | {t['conservation_error']:.2e} | - | - |"
    )
    return "\n".join(lines)


def gp_table(results: dict) -> str:
    """The GP results as a markdown table."""
    lines = [
        "| model | CE (max over t) | wall error | wall variance | MSE at t=0.5 | LL at t=0.5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["models"].values():
        lines.append(
            f"| {r['label']} | {_sci(r['ce_mean'], r['ce_se'])} | "
            f"{_sci(r['wall_error_mean'], r['wall_error_se'])} | "
            f"{_sci(r['wall_var_mean'], r['wall_var_se'])} | "
            f"{_sci(r['mse_mean'], r['mse_se'])} | {r['ll_mean']:.3f} ({r['ll_se']:.3f}) |"
        )
    return "\n".join(lines)


def environment() -> dict:
    """Versions and threads, for results.json."""
    import gpytorch
    import neuralop

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "neuraloperator": getattr(neuralop, "__version__", "?"),
        "gpytorch": gpytorch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }


# ---------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    p = argparse.ArgumentParser(
        description="Boundary conditions and conservation together: an FNO of heat in an "
        "insulated rod and a GP of diffusion between walls, each compared with one family "
        "alone and with nested wrappers.",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="the default sizes: 200/50 heat samples on 128 nodes, 30 epochs, a few minutes on "
        "2 CPU cores",
    )
    size.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data, two optimiser steps, one seed: checks the pipeline in seconds",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="training seeds (FNO weights and batch order; GP observations); default 0 1 2 "
        "(--smoke: 0)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the heat training epochs")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("heat", "gp"),
        default=["heat", "gp"],
        help="which experiments to run (default both)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument(
        "--out", default="out", help="output root; results go to <out>/joint_constraints/"
    )
    p.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = p.parse_args(argv)
    args.size = "smoke" if args.smoke else "quick"
    if args.seeds is None:
        args.seeds = [0] if args.smoke else [0, 1, 2]
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the experiments; returns what is written to ``results.json``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="neuralop")
    heat_cfg, gp_cfg = SIZES[args.size]
    if args.epochs is not None:
        heat_cfg = HeatConfig(**{**asdict(heat_cfg), "epochs": args.epochs})
    out_dir = Path(args.out) / EXPERIMENT
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    command = ["python", "examples/joint_constraints.py"]
    command += list(sys.argv[1:] if argv is None else argv)
    payload: dict[str, Any] = {
        "experiment": EXPERIMENT,
        "size": args.size,
        "seeds": list(args.seeds),
        "command": " ".join(command),
        "environment": environment(),
    }
    tables = []
    if "heat" in args.parts:
        t0 = time.perf_counter()
        heat, preds = run_heat(heat_cfg, args.seeds, log=lambda s: print(s, flush=True))
        heat["seconds"] = time.perf_counter() - t0
        if not args.no_figures:
            heat["figures"] = heat_figures(heat, preds, out_dir)
        payload["heat"] = heat
        c = heat_cfg
        tables.append(
            f"**(a) Insulated rod, FNO: train/test {c.n_train}/{c.n_test}, {c.resolution} nodes, "
            f"{c.modes} modes, width {c.width}, {c.epochs} epochs, batch {c.batch}, seeds "
            f"{list(args.seeds)}; mean (standard error) over seeds**\n\n{heat_table(heat)}"
        )
    if "gp" in args.parts:
        t0 = time.perf_counter()
        gp, curves = run_gp(gp_cfg, args.seeds, log=lambda s: print(s, flush=True))
        gp["seconds"] = time.perf_counter() - t0
        if not args.no_figures:
            gp["figures"] = gp_figure(curves, gp_cfg, out_dir)
        payload["gp"] = gp
        g = gp_cfg
        tables.append(
            f"**(b) Diffusion GP: {g.n_obs_times * g.n_obs_per_time} noisy observations "
            f"(std {g.noise}), grid {g.n_t} x {g.n_x} (t, x), seeds {list(args.seeds)}; mean "
            f"(standard error) over seeds**\n\n{gp_table(gp)}"
        )
    payload["wall_seconds"] = time.perf_counter() - start
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1))
    print("\n" + "\n\n".join(tables))
    print(f"\n{EXPERIMENT}: {payload['wall_seconds']:.1f} s; wrote {out_dir / 'results.json'}")
    return payload


if __name__ == "__main__":
    main()
