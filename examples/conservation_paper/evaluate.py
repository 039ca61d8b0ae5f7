"""Evaluation: every black box with and without the conservation layer, at the table time t*.

The constraint is the analytic mass at each evaluated time, ``cl.Conservation.integral(mass,
dim=1, grid=x)``: the trapezoid rule over the x nodes of the evaluation grid, one row per time. A
user's call is one line per model:

- ``ProbConserv-X = cl.wrap(X, mass)``                     (noise 0, the covariance metric)
- ``HardC-X = cl.wrap(X, mass, metric="euclidean")``        (orthogonal projection of the mean)

where X is the ANP's latent-sample mixture (``cl.adapters.Ensemble(ANPGrid, sample_dim=0)``:
each latent sample's Gaussian is conditioned, then moment-matched), a gpytorch GP (its posterior
``MultivariateNormal`` conditioned with its full covariance), or a deep ensemble
(``cl.adapters.Ensemble(members)``).

Metrics per test function at t* (on the t* row of the grid): CE = trapezoid mass of the mean minus
the analytic mass; MSE = mean over x of (mean - u)^2; LL = mean over x of the Gaussian log density
of the truth (marginal variances floored at 1e-8, as the published code). The ANP and the ensemble
have a diagonal covariance per member and one constraint row per time, so their update at t* only
depends on the t* row: the tables evaluate that row alone. The GP's covariance couples the times:
it is conditioned on the masses of all ``gp_times`` rows of its evaluation grid.

Bounds (PME ``u >= 0``; Stefan ``0 <= u <= 1``, the exact solution's range: 1 at the wall, ``u*``
at the front, 0 beyond it): ``ProbConserv+Bounds-X = cl.wrap(X, mass, cl.Bounds(lo, hi,
variance="active"))`` (the mode of each member's conditioned Gaussian restricted to the box;
variance 0 on the active bounds, the free entries conditioned on the row), and the published
code's positivity step as a baseline, ``NNLS-X``: the ProbConserv mean after the update
projected onto the box (non-negative least squares of the identity system: the clip), variance
unchanged. ``BoundedMean-X`` (the bounded
mean with the unbounded ProbConserv variance) is there for the calibration comparison. The GP's
bounded posterior is the mode of its conditioned Gaussian (dense covariance on the 11 x 201
grid) restricted to the box, found by the general active-set solver, its covariance conditioned
on the active bounds; ``gp_bounds.py`` runs the GP rows alone (they do not depend on the training
seed).
"""

from __future__ import annotations

import math
import time

import gpytorch
import torch
from anp import ANP, ANPGrid
from data import PROBLEMS, Config, TestCase
from torch import Tensor
from train import MLPMember, fit_gp, scale_bounds

import constraint_layers as cl

__all__ = ["anp_members", "evaluate_case", "summarise"]

F64 = torch.float64
LL_FLOOR = 1e-8  # the published implementation's variance floor
Z90 = 1.6448536269514722  # the 90% central band of a Gaussian: mean +- Z90 sd
#: The physical bounds of each problem's solution (lower, upper); None: not bounded here.
BOUNDS = {"porous_medium": (0.0, None), "stefan": (0.0, 1.0)}


def problem_bounds(problem: str) -> cl.Bounds | None:
    """The bounds of ``problem`` as the tables measure them: ``variance="active"`` (the variance
    conditioned on the active bounds); the library's default ``variance="rows"`` keeps the
    ProbConserv uncertainty around the bounded mean (``BoundedMean-X`` measures that choice on
    the moment-matched mixture)."""
    lim = BOUNDS.get(problem)
    return None if lim is None else cl.Bounds(*lim, variance="active")


def nnls_mean(mean: Tensor, problem: str) -> Tensor:
    """The published code's positivity step on the mean after the update: the projection of the
    mean onto the box (non-negative least squares with the identity: the clip)."""
    lo, hi = BOUNDS[problem]
    return mean.clamp(lo, hi)


# --------------------------------------------------------------------------------- metrics
def case_metrics(mean: Tensor, var: Tensor, case: TestCase) -> dict[str, Tensor]:
    """Per-function CE, MSE, LL at t*; mean and var of shape (n, X)."""
    con = mass_constraint(case.mass[:, None], case.grid_x)
    n, x = mean.shape
    ce = cl.metrics.conservation_error(mean.to(F64).reshape(n, 1, 1, x), con)[:, 0]
    mse = cl.metrics.mse(mean, case.truth)
    ll = cl.metrics.gaussian_log_likelihood(case.truth, mean, var, min_variance=LL_FLOOR)
    sd = var.clamp_min(LL_FLOOR).sqrt()
    cov90 = ((case.truth - mean).abs() <= Z90 * sd).to(F64).mean(-1)
    return {"CE": ce, "MSE": mse, "LL": ll, "COV90": cov90, "MIN": mean.amin(-1).to(F64)}


def summarise(values: Tensor) -> list[float]:
    """[mean, standard error] over the test functions."""
    v = values.to(F64)
    se = float(v.std(unbiased=True) / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")
    return [float(v.mean()), se]


def mass_constraint(mass: Tensor, grid_x: Tensor) -> cl.IntegralConservation:
    """Mass ``(n, T)`` per function and time -> the integral constraint on (n, 1, T, X) grids."""
    return cl.Conservation.integral(mass[:, None, :], dim=1, grid=grid_x)


# ------------------------------------------------------------------------------------- ANP
class Float64(torch.nn.Module):
    """Hands a black box's ``(mean, variance)`` on in float64 (the update then returns float64,
    so the constrained CE sits at float64 rounding)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args):
        return tuple(v.to(F64) for v in self.model(*args))


def anp_black_box(
    anp: ANP, grid_t: Tensor, grid_x: Tensor, cfg: Config, seed: int = 0
) -> cl.adapters.Ensemble:
    """The ANP as a latent-sample mixture on a (T, X) grid: input (context_x, context_y)."""
    head = Float64(ANPGrid(anp, grid_t.float(), grid_x.float(), num_samples=cfg.latent_samples))
    head.model.seed = seed
    return cl.adapters.Ensemble(head, sample_dim=0)


def anp_members(anp: ANP, case: TestCase, cfg: Config, idx=slice(None), device="cpu"):
    """Latent-sample Gaussians at t*: mean, var of shape (S, n, X), float64."""
    cx, cy = case.data.context_x[idx].to(device), case.data.context_y[idx].to(device)
    t = torch.tensor([case.t_star])
    bb = anp_black_box(anp, t.to(device), case.grid_x.to(device), cfg)
    mean, var = bb.members[0](cx, cy)
    return mean[:, :, 0, 0].cpu(), var[:, :, 0, 0].cpu()


def _anp_models(anp: ANP, softc: ANP, case: TestCase, cfg: Config, device) -> dict:
    cx, cy = case.data.context_x.to(device), case.data.context_y.to(device)
    t = torch.tensor([case.t_star], device=device)
    gx = case.grid_x.to(device)
    con = mass_constraint(case.mass[:, None].to(device), gx)
    bb = anp_black_box(anp, t, gx, cfg)
    out = {
        "ANP": bb(cx, cy),
        "SoftC-ANP": anp_black_box(softc, t, gx, cfg)(cx, cy),
        "HardC-ANP": cl.wrap(bb, con, metric="euclidean")(cx, cy),
        "ProbConserv-ANP": cl.wrap(bb, con)(cx, cy),
    }
    bounds = problem_bounds(case.problem)
    if bounds is not None:
        out["ProbConserv+Bounds-ANP"] = cl.wrap(bb, con, bounds)(cx, cy)
        _bound_baselines(out, "ANP", case.problem)
    return {k: (m[:, 0, 0].cpu(), v[:, 0, 0].cpu()) for k, (m, v) in out.items()}


def _bound_baselines(out: dict, name: str, problem: str) -> None:
    """NNLS-X (the clipped ProbConserv mean, its variance) and BoundedMean-X (the bounded mean
    with the unbounded ProbConserv variance)."""
    m, v = out[f"ProbConserv-{name}"]
    out[f"NNLS-{name}"] = (nnls_mean(m, problem), v)
    if f"ProbConserv+Bounds-{name}" in out:
        out[f"BoundedMean-{name}"] = (out[f"ProbConserv+Bounds-{name}"][0], v)


# -------------------------------------------------------------------------------------- GP
def gp_grid_times(case: TestCase, cfg: Config) -> tuple[Tensor, int]:
    cls = PROBLEMS[case.problem]
    t = torch.linspace(*cls.t_range, cfg.gp_times, dtype=F64)
    i = int((t - case.t_star).abs().argmin())
    if abs(float(t[i]) - case.t_star) > 1e-12:
        raise ValueError(f"gp_times={cfg.gp_times} does not put a time row at t* = {case.t_star}.")
    return t, i


def _gp_models(case: TestCase, cfg: Config) -> dict:
    """Fit a GP per test function; evaluate it, its HardC and its ProbConserv posterior."""
    lo, width = scale_bounds(case.problem)
    t, i_star = gp_grid_times(case, cfg)
    x = case.grid_x
    tt, xx = torch.meshgrid(t, x, indexing="ij")
    pts = ((torch.stack([tt, xx], -1).reshape(-1, 2) - lo) / width).contiguous()
    shape = (len(t), len(x))
    bounds = problem_bounds(case.problem)
    names = ("GP", "HardC-GP", "ProbConserv-GP") + (
        () if bounds is None else ("ProbConserv+Bounds-GP",)
    )
    res = {k: ([], []) for k in names}
    for j in range(len(case)):
        gp, lik = fit_gp(
            case.data.context_x[j], case.data.context_y[j, :, 0], lo, width, cfg.gp_iters
        )
        mass = PROBLEMS[case.problem](case.family.param[j]).mass(t)  # (T,)
        con = cl.Conservation.integral(mass, dim=1, grid=x)
        models = {
            "GP": gp,
            "HardC-GP": cl.wrap(gp, con, grid_shape=shape, metric="euclidean"),
            "ProbConserv-GP": cl.wrap(gp, con, grid_shape=shape),
        }
        if bounds is not None:  # the mode of the conditioned GP restricted to the box
            models["ProbConserv+Bounds-GP"] = cl.wrap(gp, con, bounds, grid_shape=shape)
        with torch.no_grad(), gpytorch.settings.cholesky_jitter(1e-6):
            for name, model in models.items():
                pred = lik(model(pts))  # the predictive: latent posterior + observation noise
                m = pred.mean.reshape(shape)[i_star]
                v = pred.variance.reshape(shape)[i_star]
                res[name][0].append(m)
                res[name][1].append(v)
    out = {k: (torch.stack(m), torch.stack(v)) for k, (m, v) in res.items()}
    if case.problem in BOUNDS:
        _bound_baselines(out, "GP", case.problem)
    return out


# ------------------------------------------------------------------------------- ensemble
def ensemble_features(case: TestCase, grid_t: Tensor) -> Tensor:
    """(n, T, X, 3): the (t, x, parameter) inputs of the ensemble members on a grid."""
    x = case.grid_x
    n = len(case)
    tt, xx = torch.meshgrid(grid_t.to(F64), x, indexing="ij")
    p = case.family.param.reshape(n, 1, 1).expand(n, *tt.shape)
    return torch.stack([tt.expand(n, -1, -1), xx.expand(n, -1, -1), p], -1).float()


class _Member64(torch.nn.Module):
    def __init__(self, member: MLPMember) -> None:
        super().__init__()
        self.member = member

    def forward(self, features: Tensor):
        return tuple(v.to(F64) for v in self.member(features))


def ensemble_black_box(members: list[MLPMember]) -> cl.adapters.Ensemble:
    return cl.adapters.Ensemble([_Member64(m) for m in members])


def _ensemble_models(members: list[MLPMember], case: TestCase, device) -> dict:
    feats = ensemble_features(case, torch.tensor([case.t_star])).to(device)
    con = mass_constraint(case.mass[:, None].to(device), case.grid_x.to(device))
    ens = ensemble_black_box(members)
    with torch.no_grad():
        out = {
            "Ensemble": ens(feats),
            "HardC-Ensemble": cl.wrap(ens, con, metric="euclidean")(feats),
            "ProbConserv-Ensemble": cl.wrap(ens, con)(feats),
        }
        bounds = problem_bounds(case.problem)
        if bounds is not None:
            out["ProbConserv+Bounds-Ensemble"] = cl.wrap(ens, con, bounds)(feats)
            _bound_baselines(out, "Ensemble", case.problem)
    return {k: (m[:, 0, 0].cpu(), v[:, 0, 0].cpu()) for k, (m, v) in out.items()}


# ----------------------------------------------------------------------------- one case
def evaluate_case(case: TestCase, models: dict, cfg: Config, device="cpu", log=print) -> dict:
    """All models on one test case: per-model metric summaries, the per-function metrics, and the
    first function's predictions at t* (for the figures)."""
    start = time.perf_counter()
    preds = {}
    preds.update(_anp_models(models["anp"], models["softc"], case, cfg, device))
    t_anp = time.perf_counter()
    preds.update(_gp_models(case, cfg))
    t_gp = time.perf_counter()
    preds.update(_ensemble_models(models["ensemble"], case, device))
    table, first, per_function = {}, {}, {}
    for name, (m, v) in preds.items():
        met = case_metrics(m.to(F64), v.to(F64), case)
        per_function[name] = met
        table[name] = {k: summarise(val) for k, val in met.items()}
        table[name]["CE_max_abs"] = float(met["CE"].abs().max())
        table[name]["MIN_overall"] = float(met["MIN"].min())
        first[name] = (m[0].to(F64), v[0].to(F64))
    exact_ce = case_metrics(case.truth, torch.ones_like(case.truth), case)["CE"]
    seconds = time.perf_counter() - start
    log(
        f"  {case.label}: evaluated in {seconds:.1f} s (ANP family {t_anp - start:.1f} s, "
        f"GP {t_gp - t_anp:.1f} s)"
    )
    return {
        "table": table,
        "first": first,
        "per_function": per_function,
        "exact_trapezoid_ce": float(exact_ce[0]),
        "seconds": seconds,
    }


# --------------------------------------------------------------------- noise and shocks
def noise_sweep(anp: ANP, case: TestCase, cfg: Config, device="cpu") -> dict:
    """ProbConserv-ANP at constraint noise ``sigma_G`` (``conserve_mixture``): noise 0 is
    ProbConserv, noise -> inf the unconstrained ANP."""
    means, variances = anp_members(anp, case, cfg, device=device)  # (S, n, X)
    w = cl.quadrature.weights(case.grid_x, "trapezoid", dtype=F64)
    b = case.mass[:, None]
    out = {"noise": [0.0, *cfg.noise_sweep, math.inf], "CE": [], "MSE": [], "LL": []}
    for s in out["noise"]:
        mix = cl.functional.conserve_mixture(means, w, b, variances=variances, noise=s)
        met = case_metrics(mix.mean, mix.variance, case)
        for k in ("CE", "MSE", "LL"):
            out[k].append(summarise(met[k]))
    return out


def shock_samples(means: Tensor, variances: Tensor, w: Tensor, b: float, draws: int, kind: str):
    """Posterior draws of u(t*, .) of one function from a latent-sample mixture.

    ``means``, ``variances``: (S, X). The mixture is sampled exactly: ``ceil(draws / S)`` draws
    from each member's Gaussian. ``kind``: "none" (diagonal, the variances, not standard
    deviations), "euclidean" (HardC: projected means, diagonal variances), "covariance"
    (ProbConserv: each member's conditioned Gaussian with its full covariance ``diag - rank 1``,
    via the library's sampler).
    """
    k = max(1, math.ceil(draws / means.shape[0]))
    gen = torch.Generator().manual_seed(0)
    if kind.startswith("bounded"):  # each member's bounded mode, conditioned on its active set
        lo, hi = BOUNDS[kind.split(":")[1]]
        con = cl.Conservation(w.unsqueeze(0), torch.tensor([float(b)], dtype=F64))
        bounds = cl.Bounds(lo, hi, variance="active")
        bm, bv = cl.wrap(_Pair(), con, bounds)(means, variances)  # (S, X)
        post = cl.functional.condition_gaussian(bm, w, b, variance=bv)
        return post.sample(k, generator=gen).reshape(-1, means.shape[-1])[:draws]
    if kind == "none":
        eps = torch.randn((k, *means.shape), dtype=F64, generator=gen)
        samples = means + variances.sqrt() * eps
    else:
        post = cl.functional.condition_gaussian(means, w, b, variance=variances, metric=kind)
        samples = post.sample(k, generator=gen)
    return samples.reshape(-1, means.shape[-1])[:draws]


class _Pair(torch.nn.Module):
    """(mean, variance) in, (mean, variance) out: a Gaussian head for the functional calls."""

    def forward(self, mean: Tensor, variance: Tensor):
        return mean, variance


def shock_positions(models: dict, case: TestCase, cfg: Config, device="cpu") -> dict:
    """Posterior shock positions at t* for the first test function of ``case``."""
    w = cl.quadrature.weights(case.grid_x, "trapezoid", dtype=F64)
    b = float(case.mass[0])
    front = float(case.family.front(torch.tensor(case.t_star, dtype=F64))[0])
    out = {"true_front": front}
    anp_m, anp_v = anp_members(models["anp"], case, cfg, idx=slice(0, 1), device=device)
    soft_m, soft_v = anp_members(models["softc"], case, cfg, idx=slice(0, 1), device=device)
    ens = [m.to(device) for m in models["ensemble"]]
    feats = ensemble_features(case, torch.tensor([case.t_star]))[:1].to(device)
    with torch.no_grad():
        ens_out = [m(feats) for m in ens]
    ens_m = torch.stack([m[0, 0, 0] for m, _ in ens_out]).cpu().to(F64)
    ens_v = torch.stack([v[0, 0, 0] for _, v in ens_out]).cpu().to(F64)
    runs = {
        "ANP": (anp_m[:, 0], anp_v[:, 0], "none"),
        "SoftC-ANP": (soft_m[:, 0], soft_v[:, 0], "none"),
        "HardC-ANP": (anp_m[:, 0], anp_v[:, 0], "euclidean"),
        "ProbConserv-ANP": (anp_m[:, 0], anp_v[:, 0], "covariance"),
        "Ensemble": (ens_m, ens_v, "none"),
        "ProbConserv-Ensemble": (ens_m, ens_v, "covariance"),
    }
    if case.problem in BOUNDS:
        kind = f"bounded:{case.problem}"
        runs["ProbConserv+Bounds-ANP"] = (anp_m[:, 0], anp_v[:, 0], kind)
        runs["ProbConserv+Bounds-Ensemble"] = (ens_m, ens_v, kind)
    for name, (m, v, kind) in runs.items():
        s = shock_samples(m, v, w, b, cfg.shock_draws, kind)
        pos = cl.metrics.shock_position(s, case.grid_x)
        finite = pos[torch.isfinite(pos)]
        out[name] = {
            "positions": pos.tolist(),
            "mean": float(finite.mean()) if finite.numel() else float("nan"),
            "std": float(finite.std()) if finite.numel() > 1 else float("nan"),
            "never_below_zero": int((~torch.isfinite(pos)).sum()),
        }
    return out


# ------------------------------------------------------------------------ mass over time
def mass_over_time(models: dict, case: TestCase, cfg: Config, device="cpu") -> dict:
    """Total mass over time of the first test function: mean and std of the mass under the
    unconstrained ANP, SoftC-ANP and ProbConserv-ANP, and the truth."""
    cls = PROBLEMS[case.problem]
    t = torch.linspace(*cls.t_range, cfg.fig_times, dtype=F64)
    x = case.grid_x
    w = cl.quadrature.weights(x, "trapezoid", dtype=F64)
    truth = PROBLEMS[case.problem](case.family.param[0]).mass(t)  # analytic, first function
    cx, cy = case.data.context_x[:1].to(device), case.data.context_y[:1].to(device)
    out = {"t": t.tolist(), "truth": truth.tolist()}
    con = mass_constraint(truth[None, :].to(device), x.to(device))
    for name, key in (("ANP", "anp"), ("SoftC-ANP", "softc")):
        bb = anp_black_box(models[key], t.to(device), x.to(device), cfg)
        m, v = bb.members[0](cx, cy)  # (S, 1, 1, T, X)
        m, v = m[:, 0, 0].cpu(), v[:, 0, 0].cpu()
        mass_s = m @ w  # (S, T) per latent sample
        var = (v * w.square()).sum(-1).mean(0) + mass_s.var(0, unbiased=False)
        out[name] = {"mean": mass_s.mean(0).tolist(), "std": var.sqrt().tolist()}
        if name == "ANP":
            pm, _ = cl.wrap(bb, con)(cx, cy)
            pc = pm[0, 0].cpu() @ w
            # no band: at noise 0 each conditioned member has G Sigma~ G^T = 0 and G mean = b
            out["ProbConserv-ANP"] = {"mean": pc.tolist(), "std": None}
    return out
