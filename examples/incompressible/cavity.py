"""Lid-driven cavity (Re = 100): an FNO with no-slip walls alone vs walls + divergence-free.

Task: the velocity ``(u, v)`` at time ``T`` from the velocity at ``t = 0``, on an ``N x N`` grid
with nodes on the walls (``h = 1 / (N - 1)``, arrays indexed ``[..., i, j]`` with ``x = i h``,
``y = j h``; ``j = N - 1`` is the lid). The data come from the library's reference solver
(``cl.problems.Cavity``: vorticity-stream function, simulated on a finer grid), each vorticity
field turned into velocity by ``Cavity.velocity`` (central differences of the stream function
inside, the wall velocities on the walls: ``u = 1`` along the lid, its two corners included).
Inputs: ``u0, v0`` and the two coordinate channels.

Models (identical FNO, data, budget and seeds; the same seed gives the same initial weights and
batch order to every model):

- ``fno``: the plain neuraloperator FNO, 2 output channels;
- ``walls``: ``cl.wrap(fno, *walls)``, ``cl.Dirichlet`` for both channels on all four walls (the
  lid velocity on the top, zero elsewhere);
- ``walls_div``: ``cl.wrap(fno, *walls, cl.DivergenceFree(channels=(0, 1)))``, no-slip walls and
  zero divergence at every node under the default wall stencil (``torch.gradient(spacing=h,
  edge_order=2)``: central inside, second-order one-sided on the walls), the Euclidean
  projection onto both at once.

Metrics (per model, mean and standard error over the training seeds): the divergence under the
wall stencil (all nodes, and the interior nodes alone, where it is second-order central) and
under a second operator the projection does not enforce (the cell-centred 2 x 2 box divergence,
one value per cell), max and rms over the test set; the wall error; the relative L2 over the
whole field and over the interior nodes; seconds per training step (indicative).

    .venv/bin/python examples/incompressible/cavity.py --quick          # CPU, one thread
    .venv/bin/python examples/incompressible/cavity.py --smoke          # tiny grid, 1 epoch
    .venv/bin/python examples/incompressible/cavity.py --data-only      # the data's metrics alone
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import constraint_layers as cl
from constraint_layers._tolerance import tolerance

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "boundary_paper"))
from common import (  # noqa: E402  (the boundary paper's shared training pieces)
    Budget,
    environment,
    fno_modes,
    generate,
    mean_se,
    predict,
    train_model,
    write_results,
)

MODELS = ("fno", "walls", "walls_div")
LABELS = {
    "fno": "FNO",
    "walls": "FNO + walls (Dirichlet u, v)",
    "walls_div": "FNO + walls + DivergenceFree",
}
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "n_train": 128,
        "n_test": 32,
        "resolution": 33,
        "refine": 2,
        "t": 1.0,
        "modes": 8,
        "width": 20,
        "epochs": 80,
        "batch": 8,
    },
    "smoke": {
        "n_train": 4,
        "n_test": 2,
        "resolution": 9,
        "refine": 1,
        "t": 0.25,
        "modes": 2,
        "width": 4,
        "epochs": 1,
        "batch": 2,
    },
}


class Split:
    """Inputs and outputs of one split (what ``common.train_model`` reads: ``x``, ``y``, len)."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.shape[0])


class CavityTask:
    """The velocity task: ``train`` / ``test`` splits, the walls and the grid."""

    def __init__(self, train: Split, test: Split, lid: float, nodes: int, cfg: dict) -> None:
        self.train, self.test = train, test
        self.lid, self.nodes, self.cfg = lid, nodes, cfg
        self.h = 1.0 / (nodes - 1)
        self.walls = wall_conditions(lid, nodes)


# ----------------------------------------------------------------------------------- data
def velocity_fields(problem: cl.problems.Cavity, w: Tensor) -> Tensor:
    """``(u, v)`` of the vorticity ``w`` (n, N, N): (n, 2, N, N) float64."""
    u, v = problem.velocity(w)
    return torch.stack([u, v], dim=1)


def make_task(cfg: dict) -> CavityTask:
    """Generate the cavity data (data seed 0) and turn vorticity into velocity."""
    problem = cl.problems.Cavity(refine=cfg["refine"], t_final=cfg["t"])
    n = cfg["n_train"] + cfg["n_test"]
    data = generate(
        problem,
        n,
        task="single",
        resolution=cfg["resolution"],
        times=torch.tensor([cfg["t"]], dtype=torch.float64),
    )
    u0 = velocity_fields(problem, data.x[:, 0])
    u1 = velocity_fields(problem, data.y[:, 0])
    x = torch.cat([u0, data.x[:, 1:]], dim=1).float()  # u0, v0, coordinate x, coordinate y
    y = u1.float()
    k = cfg["n_train"]
    nodes = cfg["resolution"]
    return CavityTask(Split(x[:k], y[:k]), Split(x[k:], y[k:]), problem.lid_velocity, nodes, cfg)


def wall_values(lid: float, nodes: int) -> tuple[Tensor, Tensor, Tensor]:
    """The wall velocities as ``cl.Dirichlet`` values ``(1, 2, N)``: the side walls (``x = 0``,
    ``x = 1``, along ``y``), the bottom and the lid (along ``x``). The lid's two corners carry
    ``u = lid`` on every wall that meets them, as in the data."""
    side = torch.zeros(1, 2, nodes)
    side[0, 0, -1] = lid
    bottom = torch.zeros(1, 2, nodes)
    top = torch.zeros(1, 2, nodes)
    top[0, 0] = lid
    return side, bottom, top


def wall_conditions(lid: float, nodes: int) -> list:
    """No slip: ``cl.Dirichlet`` on both channels at all four walls, the lid moving."""
    side, bottom, top = wall_values(lid, nodes)
    return [
        cl.Dirichlet(side, dim=0, side="both"),
        cl.Dirichlet(bottom, dim=1, side="low"),
        cl.Dirichlet(top, dim=1, side="high"),
    ]


# --------------------------------------------------------------------------------- models
def build_model(kind: str, task: CavityTask, seed: int) -> nn.Module:
    """The model ``kind`` initialised from ``seed`` (the same FNO weights for every kind)."""
    from neuralop.models import FNO

    torch.manual_seed(seed)
    fno = FNO(
        n_modes=fno_modes(task.cfg["modes"], 2),
        in_channels=int(task.train.x.shape[1]),
        out_channels=2,
        hidden_channels=task.cfg["width"],
        positional_embedding=None,
    )
    if kind == "fno":
        return fno
    if kind == "walls":
        return cl.wrap(fno, *task.walls, extent=1.0)
    if kind == "walls_div":
        return cl.wrap(fno, *task.walls, cl.DivergenceFree(channels=(0, 1)), extent=1.0)
    raise ValueError(f"build_model: unknown model kind {kind!r}; expected one of {MODELS}.")


# -------------------------------------------------------------------------------- metrics
def divergence_gradient(y: Tensor, h: float) -> Tensor:
    """``du/dx + dv/dy`` by ``torch.gradient(spacing=h, edge_order=2)`` (the stencil that
    ``cl.DivergenceFree`` enforces): (n, N, N) float64."""
    y = y.to(torch.float64)
    du = torch.gradient(y[:, 0], spacing=h, dim=1, edge_order=2)[0]
    dv = torch.gradient(y[:, 1], spacing=h, dim=2, edge_order=2)[0]
    return du + dv


def divergence_box(y: Tensor, h: float) -> Tensor:
    """Cell-centred divergence of each 2 x 2 cell (the trapezoid flux through its four sides,
    divided by its area): (n, N - 1, N - 1) float64. Not the enforced stencil."""
    y = y.to(torch.float64)
    u, v = y[:, 0], y[:, 1]
    du = (u[:, 1:, 1:] + u[:, 1:, :-1] - u[:, :-1, 1:] - u[:, :-1, :-1]) / (2 * h)
    dv = (v[:, 1:, 1:] + v[:, :-1, 1:] - v[:, 1:, :-1] - v[:, :-1, :-1]) / (2 * h)
    return du + dv


def _max_rms(d: Tensor) -> dict[str, float]:
    return {"max": float(d.abs().max()), "rms": float(d.pow(2).mean().sqrt())}


def wall_mask(nodes: int) -> Tensor:
    """True on the wall nodes of an ``N x N`` grid."""
    m = torch.zeros(nodes, nodes, dtype=torch.bool)
    m[0], m[-1], m[:, 0], m[:, -1] = True, True, True, True
    return m


def field_metrics(pred: Tensor, task: CavityTask) -> dict[str, Any]:
    """Every metric of one model's test predictions (see the module docstring)."""
    true = task.test.y
    h = task.h
    div = divergence_gradient(pred, h)
    rows = cl.DivergenceFree(channels=(0, 1)).rows(tuple(pred.shape))
    walls = wall_mask(task.nodes)
    p64, t64 = pred.to(torch.float64), true.to(torch.float64)
    wall_err = (p64 - t64)[:, :, walls].abs()  # the data's wall values are the walls' values
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    return {
        "div_gradient": _max_rms(div),
        "div_gradient_interior": _max_rms(div[:, 1:-1, 1:-1]),
        "div_gradient_walls": _max_rms(div[:, walls]),
        "div_box": _max_rms(divergence_box(pred, h)),
        # |div| / (row scale * max |u|): the library's residual, judged at the dtype's rounding
        "div_relative_max": float(rows.relative_residual(pred).max()),
        "wall_error_max": float(wall_err.max()),
        "wall_error_mean": float(wall_err.mean()),
        "rel_l2": float(cl.metrics.relative_l2(pred, true)),
        "rel_l2_interior": float(cl.metrics.relative_l2(pred[inner], true[inner])),
        "finite": bool(torch.isfinite(pred).all()),
    }


METRIC_KEYS = (
    ("div_gradient", "max"),
    ("div_gradient", "rms"),
    ("div_gradient_interior", "max"),
    ("div_gradient_interior", "rms"),
    ("div_gradient_walls", "max"),
    ("div_box", "max"),
    ("div_box", "rms"),
    ("div_relative_max", None),
    ("wall_error_max", None),
    ("rel_l2", None),
    ("rel_l2_interior", None),
    ("s_per_step", None),
)


def _get(run: dict, key: str, sub: str | None) -> float:
    return run[key] if sub is None else run[key][sub]


def summarise(runs: list[dict]) -> dict[str, Any]:
    """Mean and standard error over the training seeds of every metric."""
    out: dict[str, Any] = {}
    for key, sub in METRIC_KEYS:
        m, se = mean_se([_get(r, key, sub) for r in runs])
        out[key if sub is None else f"{key}_{sub}"] = {"mean": m, "se": se}
    out["diverged"] = any(r["diverged"] for r in runs)
    return out


# ------------------------------------------------------------------------------- training
def run_models(
    task: CavityTask, budget: Budget, models: Sequence[str], log=print
) -> tuple[dict, dict[str, Tensor]]:
    """Train and evaluate every model for every seed (seeds outer, so that load on a shared
    machine hits every model alike); returns (per-model results, seed-0 test predictions)."""
    per_model: dict[str, list[dict]] = {k: [] for k in models}
    preds: dict[str, Tensor] = {}
    steps = math.ceil(len(task.train) / budget.batch_size)
    if budget.max_batches is not None:
        steps = min(steps, budget.max_batches)
    for seed in budget.seeds:
        for kind in models:
            model = build_model(kind, task, seed)
            log(f"  seed {seed} {kind:10s} training ...")
            fit = train_model(model, task, budget, seed)
            pred = predict(model, task.test.x, budget.eval_batch_size)
            res = {"seed": seed, **field_metrics(pred, task), **fit}
            res["s_per_step"] = statistics.median(fit["epoch_seconds"]) / steps
            per_model[kind].append(res)
            if seed == budget.seeds[0]:
                preds[kind] = pred
            log(
                f"  seed {seed} {kind:10s} rel L2 {res['rel_l2']:.4g}  div max "
                f"{res['div_gradient']['max']:.3g}  wall {res['wall_error_max']:.3g}  "
                f"{res['s_per_step']:.3g} s/step" + ("  DIVERGED" if fit["diverged"] else "")
            )
    summary = {k: {"label": LABELS[k], **summarise(r), "runs": r} for k, r in per_model.items()}
    return summary, preds


def truth_metrics(task: CavityTask) -> dict[str, Any]:
    """The divergence of the reference velocities themselves (their own discretisation)."""
    true = task.test.y
    div = divergence_gradient(true, task.h)
    walls = wall_mask(task.nodes)
    best = cl.functional.enforce_local(
        true.double(), cl.DivergenceFree(channels=(0, 1)), *task.walls, extent=1.0
    ).float()
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    return {
        "div_gradient": _max_rms(div),
        "div_gradient_interior": _max_rms(div[:, 1:-1, 1:-1]),
        "div_gradient_walls": _max_rms(div[:, walls]),
        # where the data break the wall rows: the lid, the bottom, the side walls (corners out)
        "div_gradient_lid_max": float(div[:, 1:-1, -1].abs().max()),
        "div_gradient_bottom_max": float(div[:, 1:-1, 0].abs().max()),
        "div_gradient_sides_max": float(div[:, [0, -1], 1:-1].abs().max()),
        "div_box": _max_rms(divergence_box(true, task.h)),
        "div_relative_max": float(
            cl.DivergenceFree(channels=(0, 1)).rows(tuple(true.shape)).relative_residual(true).max()
        ),
        "speed_max": float(true.norm(dim=1).max()),
        # the closest walls + div-free field to the data: the constrained model's floor
        "projected_rel_l2": float(cl.metrics.relative_l2(best, true)),
        "projected_rel_l2_interior": float(cl.metrics.relative_l2(best[inner], true[inner])),
    }


# ------------------------------------------------------------------------------- reporting
def _cell(s: dict) -> str:
    return f"{s['mean']:.3g} ({s['se']:.2g})"


def markdown_tables(results: dict) -> str:
    """The divergence table and the error / cost table."""
    models = results["models"]
    truth = results["truth"]
    div_keys = [
        ("div_gradient_max", "grad. stencil max"),
        ("div_gradient_rms", "grad. stencil rms"),
        ("div_gradient_interior_max", "interior (central) max"),
        ("div_gradient_walls_max", "wall rows max"),
        ("div_box_max", "2x2 box max"),
        ("div_box_rms", "2x2 box rms"),
    ]
    head = ["model", *[name for _, name in div_keys]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 6) + "|"]
    for r in models.values():
        lines.append("| " + " | ".join([r["label"], *[_cell(r[k]) for k, _ in div_keys]]) + " |")
    tv = [
        truth["div_gradient"]["max"],
        truth["div_gradient"]["rms"],
        truth["div_gradient_interior"]["max"],
        truth["div_gradient_walls"]["max"],
        truth["div_box"]["max"],
        truth["div_box"]["rms"],
    ]
    lines.append("| reference data | " + " | ".join(f"{v:.3g}" for v in tv) + " |")
    err_keys = [
        ("rel_l2", "rel. L2"),
        ("rel_l2_interior", "rel. L2 interior"),
        ("wall_error_max", "wall error max"),
        ("div_relative_max", "div / (row scale max|u|)"),
        ("s_per_step", "s / step"),
    ]
    head = ["model", *[name for _, name in err_keys]]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 5) + "|"]
    for r in models.values():
        lines.append("| " + " | ".join([r["label"], *[_cell(r[k]) for k, _ in err_keys]]) + " |")
    return "\n".join(lines)


def draw(task: CavityTask, preds: dict[str, Tensor], out_dir: Path, name: str) -> str:
    """Speed and streamlines (top) and log10 |div| under the wall stencil (bottom) of test
    sample 0: truth and the seed-0 models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = torch.linspace(0, 1, task.nodes).numpy()
    fields = {"truth": task.test.y[:1], **{LABELS[k]: p[:1] for k, p in preds.items()}}
    fig, axes = plt.subplots(2, len(fields), figsize=(3.3 * len(fields), 6.4), squeeze=False)
    vmax = float(task.test.y[0].norm(dim=0).max())
    for col, (label, y) in enumerate(fields.items()):
        u, v = y[0, 0].double(), y[0, 1].double()
        ax = axes[0, col]
        speed = (u**2 + v**2).sqrt()
        im = ax.pcolormesh(s, s, speed.T.numpy(), vmin=0, vmax=vmax, cmap="viridis")
        ax.streamplot(s, s, u.T.numpy(), v.T.numpy(), color="white", density=0.8, linewidth=0.6)
        ax.set_title(label, fontsize=9)
        ax.set_aspect("equal")
        fig.colorbar(im, ax=ax, fraction=0.046, label="|u|")
        ax = axes[1, col]
        div = divergence_gradient(y, task.h)[0].abs().clamp_min(1e-16).log10()
        im = ax.pcolormesh(s, s, div.T.numpy(), vmin=-8, vmax=2, cmap="magma")
        ax.set_title("log10 |div u| (grad. stencil)", fontsize=9)
        ax.set_aspect("equal")
        fig.colorbar(im, ax=ax, fraction=0.046)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=100)
    plt.close(fig)
    return name


# -------------------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU sizes (default)")
    size.add_argument("--smoke", action="store_true", help="tiny grid, one epoch, one seed")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", default="out", help="output root (results in <out>/cavity/)")
    p.add_argument(
        "--figures",
        default=None,
        help="folder for the figure (default: <out>/cavity; the committed one lives in "
        "examples/incompressible/figures)",
    )
    p.add_argument("--no-figures", action="store_true")
    p.add_argument(
        "--data-only", action="store_true", help="the reference data's metrics alone, no training"
    )
    args = p.parse_args(argv)
    args.size = "smoke" if args.smoke else "quick"
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse, generate, train, evaluate, write ``<out>/cavity/results.json``, draw, print."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", module="neuralop")
    start = time.perf_counter()
    cfg = dict(SIZES[args.size])
    budget = Budget(epochs=args.epochs or cfg["epochs"], batch_size=cfg["batch"])
    budget.seeds = tuple(args.seeds) if args.seeds else ((0,) if args.smoke else (0, 1, 2))
    if args.smoke:
        budget.max_batches = 1
    t0 = time.perf_counter()
    task = make_task(cfg)
    data_seconds = time.perf_counter() - t0
    print(f"cavity: {len(task.train)} train / {len(task.test)} test, grid {task.nodes}^2")
    if args.data_only:
        truth = truth_metrics(task)
        print(json.dumps(truth, indent=1))
        return {"truth": truth}
    models, preds = run_models(task, budget, args.models, log=lambda s: print(s, flush=True))
    out_dir = Path(args.out) / "cavity"
    payload: dict[str, Any] = {
        "experiment": "cavity",
        "size": args.size,
        "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "environment": environment(torch.device("cpu")),
        "config": cfg,
        "budget": asdict(budget) | {"step_size": budget.step},
        "data_seconds": data_seconds,
        "truth": truth_metrics(task),
        "float32_rounding_residual": tolerance(torch.float32).residual,
        "models": models,
    }
    if not args.no_figures:
        fig_dir = Path(args.figures) if args.figures else out_dir
        payload["figure"] = str(fig_dir / draw(task, preds, fig_dir, f"cavity_{args.size}.png"))
    payload["wall_seconds"] = time.perf_counter() - start
    write_results(out_dir / "results.json", payload)
    print(markdown_tables(payload))
    print(f"\ncavity: {payload['wall_seconds']:.1f} s wall; wrote {out_dir / 'results.json'}")
    return payload


if __name__ == "__main__":
    main()
