"""Periodic 2D incompressible Navier-Stokes: a plain FNO against three divergence-free ones.

Data (``cl.problems.NavierStokes2D``, pseudo-spectral on the unit torus, viscosity 1e-3, the
forcing of Li et al. 2021): random initial vorticity from their Gaussian random field, solved on a
grid twice as fine as the model's and truncated to the model's grid in Fourier space (so every
field is spectrally divergence-free and has no Nyquist content). The task maps the velocity
``u = (psi_y, -psi_x)`` at ``t`` to the velocity at ``t + T`` (one step; the models are also
rolled out autoregressively). The four models share the FNO, its initialisation per training
seed, the data, the batches and the budget:

- ``plain``: the FNO;
- ``central``: ``cl.wrap(fno, cl.DivergenceFree(periodic=True))`` (central differences that wrap
  around);
- ``spectral``: ``cl.wrap(fno, cl.DivergenceFree(periodic=True, stencil="spectral"))``;
- ``hodge``: the FNO followed by :class:`HodgeProjection`, our re-implementation, from its
  description only, of the Helmholtz-Hodge spectral projection proposed for neuraloperator (pull
  request #648, "Divergence-free Spectral Projection").

Reported per model, mean (standard error) over the training seeds: the divergence of the test
predictions under three discrete operators (central periodic, spectral, and ``torch.gradient``
with ``edge_order=2`` as a wall-style operator), max and rms; the relative L2 error on the test
pairs; an autoregressive rollout (the kinetic energy against the solver's, steps until blow-up);
seconds per training step (indicative when the machine is shared). One Gaussian case: the plain
FNOs of the training seeds as an ensemble (mean and per-node variance), conditioned on the
divergence-free rows with ``cl.functional.condition_local``: Gaussian log-likelihood of the test
truth and the divergence, before and after.

Run:  python examples/incompressible/navier_stokes.py [--smoke | --quick] [--seeds 0 1 2]

Results go to ``navier_stokes_<budget>.json`` next to this script (or ``--out``), the figures to
``figures/``; the data and each trained run are cached under ``out/`` (``--retrain`` ignores the
cached runs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import Tensor, nn

import constraint_layers as cl

HERE = Path(__file__).resolve().parent
F64 = torch.float64
MODELS = ("plain", "central", "spectral", "hodge")
OPERATORS = ("central", "spectral", "gradient")


@dataclass(frozen=True)
class Budget:
    n: int  # the model's grid (n x n)
    solver_n: int  # the solver's grid
    dt: float  # the solver's largest time step
    step: float  # T: the model maps u(t) to u(t + T)
    frames: int  # one-step pairs per training trajectory
    train_traj: int
    test_traj: int
    rollout: int  # K: rollout steps (the test trajectories hold K + 1 frames)
    width: int
    modes: int
    layers: int
    epochs: int
    batch: int
    lr: float
    viscosity: float = 1e-3


BUDGETS = {
    "smoke": Budget(16, 32, 0.01, 0.5, 3, 4, 2, 3, 8, 4, 2, 1, 4, 3e-3),
    "quick": Budget(32, 64, 2e-3, 0.5, 10, 40, 10, 20, 16, 8, 4, 30, 16, 3e-3),
    "full": Budget(64, 128, 1e-3, 0.5, 10, 100, 20, 40, 32, 16, 4, 60, 16, 3e-3),
}


# ----------------------------------------------------------------------------------- data
def truncate(w: Tensor, n: int) -> Tensor:
    """The Fourier modes ``|k_x|, |k_y| < n / 2`` of ``w`` (..., N, N), on the n x n grid (even
    ``n``; no Nyquist mode): (..., n, n)."""
    big = w.shape[-1]
    wh = torch.fft.rfft2(w)
    h = n // 2
    out = torch.zeros((*w.shape[:-2], n, h + 1), dtype=wh.dtype)
    out[..., :h, :h] = wh[..., :h, :h]
    out[..., h + 1 :, :h] = wh[..., big - h + 1 :, :h]
    return torch.fft.irfft2(out * (n * n / (big * big)), s=(n, n))


def trajectories(ns, b: Budget, count: int, frames: int, seed: int) -> Tensor:
    """Velocity trajectories (count, frames + 1, 2, n, n), float64, frame 0 the initial field."""
    w0 = ns.initial_condition(count, b.solver_n, seed=seed)
    ws = ns.solve(w0, t=frames * b.step, dt=b.dt, record=frames)
    w = truncate(torch.cat([w0.unsqueeze(1), ws], 1), b.n)
    return ns.velocity(w.flatten(0, 1)).reshape(count, frames + 1, 2, b.n, b.n)


def load_data(b: Budget, cache: Path) -> dict:
    """Training and test trajectories (cached with ``torch.save``, loaded with
    ``weights_only=True``)."""
    key = f"ns_n{b.n}_N{b.solver_n}_dt{b.dt:g}_T{b.step:g}_{b.train_traj}x{b.frames}_"
    key += f"{b.test_traj}x{b.rollout}_nu{b.viscosity:g}.pt"
    path = cache / key
    if path.exists():
        return torch.load(path, weights_only=True)
    ns = cl.problems.NavierStokes2D(b.viscosity, forcing="li")
    t0 = time.perf_counter()
    data = {
        "train": trajectories(ns, b, b.train_traj, b.frames, seed=1),
        "test": trajectories(ns, b, b.test_traj, max(b.rollout, b.frames), seed=2),
        "seconds": torch.tensor(time.perf_counter() - t0),
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def pairs(traj: Tensor, frames: int) -> tuple[Tensor, Tensor]:
    """One-step pairs (u(t_i), u(t_{i+1})), i < frames: each (count * frames, 2, n, n)."""
    return traj[:, :frames].flatten(0, 1), traj[:, 1 : frames + 1].flatten(0, 1)


# ----------------------------------------------------------------------- divergence
def divergence(u: Tensor, operator: str, extent: float = 1.0) -> Tensor:
    """``d u_0 / dx + d u_1 / dy`` of u (batch, 2, n, n) on the periodic grid of spacing
    ``extent / n`` (float64), written here independently of the library:

    - ``central``: ``(u[i+1] - u[i-1]) / 2h``, indices modulo n;
    - ``spectral``: ``i 2 pi k / L`` on the discrete Fourier coefficients, the Nyquist
      coefficient's derivative set to zero (the library's ``stencil="spectral"``);
    - ``gradient``: ``torch.gradient(spacing=h, edge_order=2)`` (one-sided at the grid's edges,
      as at walls: it does not know the field is periodic).
    """
    u = u.to(F64)
    n = u.shape[-1]
    h = extent / n
    if operator == "central":
        dx = (u[:, 0].roll(-1, -2) - u[:, 0].roll(1, -2)) / (2 * h)
        dy = (u[:, 1].roll(-1, -1) - u[:, 1].roll(1, -1)) / (2 * h)
        return dx + dy
    if operator == "spectral":
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=F64).round()
        k = torch.where(k.abs() == n // 2, 0.0, k) * (2 * math.pi / extent)
        dx = torch.fft.ifft(1j * k.reshape(-1, 1) * torch.fft.fft(u[:, 0], dim=-2), dim=-2)
        dy = torch.fft.ifft(1j * k * torch.fft.fft(u[:, 1], dim=-1), dim=-1)
        return (dx + dy).real
    if operator == "gradient":
        dx = torch.gradient(u[:, 0], spacing=h, dim=-2, edge_order=2)[0]
        dy = torch.gradient(u[:, 1], spacing=h, dim=-1, edge_order=2)[0]
        return dx + dy
    raise ValueError(f"divergence: operator must be one of {OPERATORS}, got {operator!r}.")


def ns_vorticity(u: Tensor, b: Budget) -> Tensor:
    """The vorticity ``v_x - u_y`` of velocities (batch, 2, n, n), spectrally."""
    return cl.problems.NavierStokes2D(b.viscosity).vorticity(u)


def divergence_stats(u: Tensor) -> dict:
    out = {}
    for op in OPERATORS:
        d = divergence(u, op)
        out[f"div_{op}_max"] = float(d.abs().max())
        out[f"div_{op}_rms"] = float(d.square().mean().sqrt())
    return out


# ---------------------------------------------------------------------------- models
class HodgeProjection(nn.Module):
    """The Helmholtz-Hodge projection onto divergence-free fields, per wavenumber (periodic 2D).

    Re-implemented from the description of neuraloperator pull request #648 ("Divergence-free
    Spectral Projection"); no code of it was read or copied. For ``u`` (batch, 2, n1, n2) on a
    torus of side ``extent``: ``u_hat(k) - k (k . u_hat(k)) / |k|^2`` at every wavenumber
    ``k = 2 pi (k1, k2) / L`` except ``k = 0`` (the mean flow, kept), with the signed integer
    wavenumbers as ``torch.fft.fftfreq`` / ``rfftfreq`` give them (the Nyquist index is
    ``-n1 / 2`` along the first axis and ``+n2 / 2`` along the second). It computes in the
    input's dtype. Deterministic, periodic only; the projection proposed there takes a set of
    modes to constrain, here every mode is projected.
    """

    def __init__(self, extent: float = 1.0) -> None:
        super().__init__()
        self.extent = float(extent)

    def forward(self, u: Tensor) -> Tensor:  # shape: (batch, 2, n1, n2)
        n1, n2 = u.shape[-2:]
        real = u.dtype
        k1 = torch.fft.fftfreq(n1, self.extent / n1, dtype=real, device=u.device)
        k2 = torch.fft.rfftfreq(n2, self.extent / n2, dtype=real, device=u.device)
        k1 = (2 * math.pi * k1).reshape(-1, 1)
        k2 = (2 * math.pi * k2).reshape(1, -1)
        ksq = k1.square() + k2.square()
        uh = torch.fft.rfft2(u)
        kdotu = (k1 * uh[:, 0] + k2 * uh[:, 1]) / torch.where(ksq == 0, 1.0, ksq)
        out = torch.stack([uh[:, 0] - k1 * kdotu, uh[:, 1] - k2 * kdotu], 1)
        return torch.fft.irfft2(out, s=(n1, n2))


def make_fno(b: Budget, seed: int, embedding: bool = True) -> nn.Module:
    """neuraloperator's FNO, seeded; ``embedding=False``: without its (non-periodic) ``grid``
    positional embedding."""
    from neuralop.models import FNO

    torch.manual_seed(seed)
    extra = {} if embedding else {"positional_embedding": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return FNO(
            n_modes=(b.modes, b.modes),
            in_channels=2,
            out_channels=2,
            hidden_channels=b.width,
            n_layers=b.layers,
            **extra,
        )


def build(name: str, fno: nn.Module) -> nn.Module:
    if name == "plain":
        return fno
    if name == "central":
        return cl.wrap(fno, cl.DivergenceFree(periodic=True))
    if name == "spectral":
        return cl.wrap(fno, cl.DivergenceFree(periodic=True, stencil="spectral"))
    if name == "hodge":
        return nn.Sequential(fno, HodgeProjection(extent=1.0))
    raise ValueError(f"build: model must be one of {MODELS}, got {name!r}.")


# -------------------------------------------------------------------------- training
def rel_l2(pred: Tensor, ref: Tensor) -> Tensor:
    """Per sample ``|pred - ref| / |ref|``: (batch,)."""
    return (pred - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)


def energy(u: Tensor) -> Tensor:
    """Kinetic energy ``(1/2) mean |u|^2`` per sample: (batch,)."""
    return 0.5 * u.to(F64).square().sum(-3).mean((-2, -1))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, scale: float, chunk: int = 50) -> Tensor:
    """The model's prediction for velocities ``x`` (physical units), float64."""
    model.eval()
    out = [model((x[i : i + chunk] / scale).float()) for i in range(0, len(x), chunk)]
    return torch.cat(out).to(F64) * scale


def rollout(model: nn.Module, traj: Tensor, steps: int, scale: float) -> dict:
    """Roll the model out ``steps`` steps from frame 0 of each test trajectory."""
    u = traj[:, 0]
    e_true = energy(traj[:, : steps + 1].flatten(0, 1)).reshape(len(traj), steps + 1)
    e_model = [energy(u)]
    blow = torch.full((len(traj),), steps, dtype=torch.long)
    alive = torch.ones(len(traj), dtype=torch.bool)
    for k in range(1, steps + 1):
        u = predict(model, u, scale)
        e = energy(u)
        e_model.append(e)
        bad = alive & (~torch.isfinite(u).flatten(1).all(1) | ~(e <= 10 * e_true[:, k]))
        blow[bad] = k
        alive &= ~bad
    e_model = torch.stack(e_model, 1)
    e_end = e_true[:, steps]
    last = rel_l2(u, traj[:, steps])
    return {
        "energy_ratio_K": float((e_model[:, -1] / e_model[:, 0]).mean()),  # E(K) / E(0)
        "energy_ratio_K_solver": float((e_true[:, steps] / e_true[:, 0]).mean()),
        "energy_rel_err_K": float(((e_model[:, -1] - e_end).abs() / e_end).mean()),
        "energy_rel_err_mean": float(((e_model - e_true).abs() / e_true)[:, 1:].mean()),
        "steps_to_blowup": float(blow.to(F64).mean()),
        "rollout_rel_l2_K": float(last.mean()) if bool(torch.isfinite(last).all()) else math.inf,
        "energy_model": e_model.mean(0).tolist(),
        "energy_solver": e_true.mean(0).tolist(),
    }


def train_one(
    name: str, seed: int, b: Budget, data: dict, scale: float, embedding: bool = True
) -> tuple[dict, Tensor]:
    model = build(name, make_fno(b, seed, embedding))
    x, y = pairs(data["train"], b.frames)
    x, y = (x / scale).float(), (y / scale).float()
    steps_per_epoch = math.ceil(len(x) / b.batch)
    opt = torch.optim.Adam(model.parameters(), lr=b.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=b.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(seed)
    steps, t_steps, losses = 0, 0.0, []
    for _ in range(b.epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), b.batch):
            idx = perm[i : i + b.batch]
            t0 = time.perf_counter()
            loss = rel_l2(model(x[idx]), y[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t_steps += time.perf_counter() - t0
            sched.step()
            steps += 1
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(x))
    tx, ty = pairs(data["test"], b.frames)
    pred = predict(model, tx, scale)
    out = {"model": name, "seed": seed, "steps": steps, "s_per_step": t_steps / steps}
    out["train_loss_last_epoch"] = losses[-1]
    out["rel_l2"] = float(rel_l2(pred, ty).mean())
    out.update(divergence_stats(pred))
    out.update(rollout(model, data["test"], b.rollout, scale))
    return out, pred


# ---------------------------------------------------------------------------- Gaussian
def gaussian_ll(truth: Tensor, mean: Tensor, var: Tensor) -> float:
    """Mean per-node Gaussian log-likelihood of ``truth`` under ``N(mean, var)``."""
    ll = -0.5 * (torch.log(2 * math.pi * var) + (truth - mean).square() / var)
    return float(ll.mean())


def gaussian_case(preds: list[Tensor], truth: Tensor, every: int) -> dict:
    """The ensemble of the plain FNOs (mean, unbiased per-node variance), before and after
    conditioning on the divergence-free rows (central and spectral), on every ``every``-th test
    pair."""
    stack = torch.stack(preds)[:, ::every]
    truth = truth[::every]
    mean, var = stack.mean(0), stack.var(0, unbiased=True)
    rows = {"ensemble": (mean, var)}
    for name, stencil in (("central", "gradient"), ("spectral", "spectral")):
        c = cl.DivergenceFree(periodic=True, stencil=stencil)
        post = cl.functional.condition_local(mean, var, c)
        rows[f"conditioned ({name})"] = (post.mean, post.variance)
    out = {"members": len(preds), "test_pairs": len(truth)}
    for name, (m, v) in rows.items():
        r = {"ll": gaussian_ll(truth, m, v), "rel_l2": float(rel_l2(m, truth).mean())}
        r["min_variance"] = float(v.min())
        r.update(divergence_stats(m))
        out[name] = r
    return out


# ------------------------------------------------------------------------- reporting
def summarise(runs: list[dict]) -> dict:
    out = {}
    for k, v0 in runs[0].items():
        if k in ("model", "seed") or isinstance(v0, list):
            continue
        v = torch.tensor([r[k] for r in runs], dtype=F64)
        se = float(v.std(unbiased=True) / math.sqrt(len(v))) if len(v) > 1 else math.nan
        out[k] = (float(v.mean()), se)
    return out


def fmt(m: float, e: float) -> str:
    return f"{m:.3g} ({e:.2g})"


def tables(res: dict) -> str:
    s = res["summary"]
    lines = ["| model | " + " | ".join(f"div {o} max / rms" for o in OPERATORS) + " |"]
    lines.append("|---" * (len(OPERATORS) + 1) + "|")
    t = res["truth"]
    cells = [f"{t[f'div_{o}_max']:.3g} / {t[f'div_{o}_rms']:.3g}" for o in OPERATORS]
    lines.append("| solver (truth) | " + " | ".join(cells) + " |")
    for name in MODELS:
        if name in s:
            cells = [
                fmt(*s[name][f"div_{o}_max"]) + " / " + fmt(*s[name][f"div_{o}_rms"])
                for o in OPERATORS
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | rel. L2 (test) | E(K)/E(0) | rel. energy error at K | "
        "mean rel. energy error | steps to blow-up (of K) | rollout rel. L2 at K | "
        "s / step (indicative) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = (
        "rel_l2",
        "energy_ratio_K",
        "energy_rel_err_K",
        "energy_rel_err_mean",
        "steps_to_blowup",
        "rollout_rel_l2_K",
        "s_per_step",
    )
    lines.append(f"| solver | - | {res['solver_energy_ratio_K']:.3g} | - | - | - | - | - |")
    for name in MODELS:
        if name in s:
            lines.append(f"| {name} | " + " | ".join(fmt(*s[name][k]) for k in keys) + " |")
    for name, (m, e) in res.get("posthoc", {}).items():
        lines.append(f"| {name} | {fmt(m, e)} | - | - | - | - | - | - |")
    t = res["truth"]
    for name in ("central", "spectral"):
        r = t[f"rel_l2_projected_{name}"]
        lines.append(f"| truth, projected ({name}): the floor | {r:.3g} | - | - | - | - | - | - |")
    g = res.get("gaussian")
    if g:
        head = "| ensemble of plain FNOs | LL per node | rel. L2 (mean) | "
        head += "div central max / rms | div spectral max / rms |"
        lines += ["", head, "|---|---|---|---|---|"]
        for name, r in g.items():
            if isinstance(r, dict):
                lines.append(
                    f"| {name} | {r['ll']:.4g} | {r['rel_l2']:.4g} | "
                    f"{r['div_central_max']:.3g} / {r['div_central_rms']:.3g} | "
                    f"{r['div_spectral_max']:.3g} / {r['div_spectral_rms']:.3g} |"
                )
    return "\n".join(lines)


def figures(fields: dict, truth: Tensor, folder: Path, budget: str) -> None:
    """Vorticity of one test sample (truth and each model, training seed 0) and the divergence
    maps under the central operator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    ns = cl.problems.NavierStokes2D(1e-3)
    panels = {"truth": truth, **fields}
    vort = {k: ns.vorticity(v.unsqueeze(0))[0] for k, v in panels.items()}
    lim = float(vort["truth"].abs().max())
    fig, axes = plt.subplots(1, len(vort), figsize=(2.4 * len(vort), 2.6))
    for ax, (k, w) in zip(axes, vort.items()):
        ax.imshow(w.T, origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(k, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("vorticity (spectral, from the velocity): test sample, seed 0", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / f"ns_vorticity_{budget}.png", dpi=80)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(fields), figsize=(2.6 * len(fields), 2.7))
    for ax, (k, u) in zip(axes, fields.items()):
        d = divergence(u.unsqueeze(0), "central")[0]
        im = ax.imshow(d.T, origin="lower", cmap="RdBu_r")
        ax.set_title(f"{k}: max {float(d.abs().max()):.1e}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.colorbar(im, ax=ax, fraction=0.046, format="%.0e").ax.tick_params(labelsize=6)
    fig.suptitle(
        "divergence under central periodic differences (own colour scale each)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(folder / f"ns_divergence_{budget}.png", dpi=80)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="seconds: tiny grid, 1 epoch")
    group.add_argument("--quick", action="store_true", help="32 x 32, tens of epochs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--out", type=Path, default=HERE, help="where the JSON and figures/ go")
    ap.add_argument("--cache", type=Path, default=None, help="data and runs (default out/)")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached runs")
    ap.add_argument("--gaussian-every", type=int, default=None, help="every k-th test pair")
    ap.add_argument(
        "--no-embedding",
        action="store_true",
        help="FNOs without the grid positional embedding (results named *_noemb; no figures)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    budget = "smoke" if args.smoke else "quick" if args.quick else "full"
    b = BUDGETS[budget]
    label = budget + ("_noemb" if args.no_embedding else "")
    cache = args.cache or (args.out / "out")
    data = load_data(b, cache)
    print(f"data: {budget}, generated in {float(data['seconds']):.1f} s", flush=True)
    x, _ = pairs(data["train"], b.frames)
    scale = float(x.square().mean().sqrt())  # one number: the rms velocity of the training set
    _, ty = pairs(data["test"], b.frames)
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    preds: dict[str, dict[int, Tensor]] = {m: {} for m in args.models}
    for seed in args.seeds:
        for name in args.models:  # interleaved per seed: the same load for each model
            path = cache / "runs" / f"{label}_{name}_{seed}"
            if path.with_suffix(".json").exists() and not args.retrain:
                r = json.loads(path.with_suffix(".json").read_text())
                p = torch.load(path.with_suffix(".pt"), weights_only=True)
            else:
                r, p = train_one(name, seed, b, data, scale, not args.no_embedding)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".json").write_text(json.dumps(r))
                torch.save(p, path.with_suffix(".pt"))
            runs[name].append(r)
            preds[name][seed] = p
            shown = {k: v for k, v in r.items() if not isinstance(v, list)}
            print(json.dumps(shown), flush=True)
    truth = divergence_stats(ty)
    truth["rms_vorticity"] = float(ns_vorticity(ty, b).square().mean().sqrt())
    for name, stencil in (("central", "gradient"), ("spectral", "spectral")):
        c = cl.DivergenceFree(periodic=True, stencil=stencil)
        # the error floor of a model constrained by c: the truth moved onto c's rows
        moved = cl.functional.enforce_local(ty, c)
        truth[f"rel_l2_projected_{name}"] = float(rel_l2(moved, ty).mean())
    res = {
        "budget": budget,
        "positional_embedding": not args.no_embedding,
        "config": asdict(b),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "velocity_scale": scale,
        "truth": truth,
        "solver_energy_ratio_K": runs[args.models[0]][0]["energy_ratio_K_solver"],
        "runs": runs,
        "summary": {m: summarise(v) for m, v in runs.items()},
    }
    if "plain" in args.models:  # the plain FNO projected at test time only (one-step pairs)
        res["posthoc"] = {}
        for name, stencil in (("central", "gradient"), ("spectral", "spectral")):
            c = cl.DivergenceFree(periodic=True, stencil=stencil)
            rows = [
                {
                    "rel_l2": float(
                        rel_l2(cl.functional.enforce_local(preds["plain"][s], c), ty).mean()
                    )
                }
                for s in args.seeds
            ]
            res["posthoc"][f"plain, projected at test ({name})"] = summarise(rows)["rel_l2"]
    if "plain" in args.models and len(args.seeds) > 1:
        every = args.gaussian_every or max(1, len(ty) // 50)
        res["gaussian"] = gaussian_case([preds["plain"][s] for s in args.seeds], ty, every)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"navier_stokes_{label}.json").write_text(json.dumps(res, indent=1))
    if not args.no_embedding:
        seed0 = args.seeds[0]
        i = min(len(ty) - 1, b.frames // 2)  # trajectory 0, a middle frame
        fields = {m: preds[m][seed0][i] for m in args.models}
        figures(fields, ty[i], args.out / "figures", budget)
    print(tables(res))
    return res


if __name__ == "__main__":
    main()
