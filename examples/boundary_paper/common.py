"""Shared pieces of the boundary-paper reproduction (BOON, Saad et al., ICLR 2023).

Every experiment script builds :class:`Task` objects (train / test data, the boundary conditions,
the paper's FNO settings) and a :class:`Budget`, then calls :func:`run_experiment`, which trains
every model of :data:`MODELS` on the same data, with the same budget and the same seeds (the same
seed gives the same initial FNO weights and the same batch order to every model), evaluates them,
writes ``results.json`` and returns the predictions for the figures.

Models
------
- ``fno``: the plain neuraloperator FNO;
- ``output``: ``cl.wrap(fno, *bcs)``, the exact output step, trained with it in the loop;
- ``refine``: ``cl.wrap(fno, *bcs, mode="refine")``, the library's kernel refinement;
- ``scalar_pivot``: the reference code's scalar-pivot correction (``scalar_pivot.py``), without its
  known defects, plus the same output step.

Conventions: coordinate channels include both ends of every axis (the data's ``coords=True``);
neuraloperator's positional embedding is off. Boundary values that the input does not determine
(Dirichlet data of Stokes, Burgers, the cavity) are given to EVERY model as extra input channels
(the face values broadcast along the constrained axis); the constrained models read them back
through a callable of the input (:class:`InputFace`). Errors are measured on physical outputs.
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import constraint_layers as cl
from constraint_layers.problems import OperatorData

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scalar_pivot import attach_scalar_pivots

MODELS = ("fno", "output", "refine", "scalar_pivot")
#: ``refine_frozen``: the refinement with its boundary block frozen (a constant for autograd:
#: ``kernel_grad="detached"``, as the library first did); studied in ``refine_gradients.py``,
#: not a default model.
ALL_MODELS = (*MODELS, "refine_frozen")
LABELS = {
    "fno": "FNO",
    "output": "FNO + output step",
    "refine": "FNO + refine (library, exact gradients)",
    "scalar_pivot": "FNO + scalar pivots (reference scheme)",
    "refine_frozen": "FNO + refine, frozen probe (approximate gradients)",
}


# --------------------------------------------------------------------------------- inputs
class InputFace:
    """A boundary value read off the input channel that carries it.

    The channel holds the face values broadcast along ``dim`` (see :func:`with_face_channels`);
    reading index 0 along ``dim`` gives the face, shape ``(batch, 1, *face dims)``.
    """

    def __init__(self, channel: int, dim: int) -> None:
        self.channel = channel
        self.dim = dim
        self.__name__ = f"input[{channel}]"

    def __call__(self, x: Tensor) -> Tensor:
        return x[:, self.channel : self.channel + 1].select(2 + self.dim, 0)


def with_face_channels(data: OperatorData, faces: Sequence[tuple[str, int]]) -> OperatorData:
    """Append one input channel per face: ``data.boundary[key]`` broadcast along axis ``dim``.

    Returns a copy of ``data`` whose ``x`` has ``len(faces)`` more channels (after the existing
    ones, in the order given) and whose ``meta["face_channels"]`` maps each key to its channel.
    """
    x = data.x
    chans = {}
    extra = []
    grid = tuple(x.shape[2:])
    for key, dim in faces:
        face = data.boundary[key].to(x)  # (n, 1, *face dims)
        chan = face.unsqueeze(2 + dim).expand(x.shape[0], 1, *grid)
        chans[key] = x.shape[1] + len(extra)
        extra.append(chan)
    meta = dict(data.meta, face_channels=chans)
    return OperatorData(
        x=torch.cat([x, *extra], dim=1),
        y=data.y,
        coords=data.coords,
        params=data.params,
        boundary=data.boundary,
        meta=meta,
    )


def dirichlet_from_inputs(
    data: OperatorData, faces: Sequence[tuple[str, int, str]]
) -> tuple[OperatorData, list]:
    """Dirichlet conditions whose values the model reads off its input.

    ``faces``: ``(boundary key, dim, side)`` per wall, e.g. ``("x_low", 0, "low")``. Returns the
    data with one face channel per wall (:func:`with_face_channels`) and the conditions.
    """
    data = with_face_channels(data, [(key, dim) for key, dim, _ in faces])
    chans = data.meta["face_channels"]
    bcs = [cl.Dirichlet(InputFace(chans[key], dim), dim=dim, side=side) for key, dim, side in faces]
    return data, bcs


def generate(problem: Any, n: int, *, cache: bool = False, **kwargs: Any) -> OperatorData:
    """``problem.generate`` with coordinate channels, data seed 0 and one solver thread."""
    kwargs.setdefault("seed", 0)
    return problem.generate(n, coords=True, cache=cache, threads=1, **kwargs)


def sized(sizes: dict, size: str, smoke: bool) -> dict:
    """The settings of ``size`` ("quick" / "medium" / "full"); ``smoke`` keeps the grid, shrinks
    the data."""
    cfg = dict(sizes[size])
    if smoke:
        cfg.update(n_train=4, n_test=2, batch=2)
        cfg.update(sizes.get("smoke", {}) if size in ("quick", "medium") else {})
    return cfg


def grid_spacing(data: OperatorData) -> tuple[float, ...]:
    """The spacing of every grid axis from the data's coordinates."""
    return tuple(float(c[1] - c[0]) for c in data.coords.values())


# ---------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One learning problem: data, conditions and the FNO settings of the paper."""

    name: str
    title: str
    train: OperatorData
    test: OperatorData
    #: one condition per wall, applied in this order
    bcs: list
    #: a name per condition (the table's columns)
    walls: list[str]
    #: Fourier modes in the paper's convention (positive frequencies kept per axis)
    modes: int
    width: int
    inputs: str
    notes: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, ...]:
        return grid_spacing(self.test)

    @property
    def frames(self) -> bool:
        return "t" in self.test.coords

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "x_shape": list(self.train.x.shape[1:]),
            "y_shape": list(self.train.y.shape[1:]),
            "grid": {k: len(v) for k, v in self.test.coords.items()},
            "conditions": [repr(bc) for bc in self.bcs],
            "walls": self.walls,
            "fno": {
                "modes_paper_convention": self.modes,
                "n_modes_neuralop": list(fno_modes(self.modes, self.test.y.ndim - 2)),
                "hidden_channels": self.width,
                "in_channels": int(self.train.x.shape[1]),
            },
            "inputs": self.inputs,
            "notes": self.notes,
            "data_spec": {k: v for k, v in self.test.meta.get("spec", {}).items() if k != "n"},
        }


@dataclass
class Budget:
    """The training budget (the same for every model)."""

    epochs: int
    batch_size: int
    seeds: tuple[int, ...] = (0, 1, 2)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    gamma: float = 0.5
    #: halve the learning rate every ``step_size`` epochs (default: epochs // 5, as 100 of 500)
    step_size: int | None = None
    #: at most this many batches per epoch (smoke runs)
    max_batches: int | None = None
    eval_batch_size: int = 50

    @property
    def step(self) -> int:
        return self.step_size or max(1, self.epochs // 5)


def fno_modes(modes: int, ndim: int) -> tuple[int, ...]:
    """neuraloperator ``n_modes`` keeping ``modes`` frequencies per axis as the paper's FNO code.

    The paper's code keeps frequencies ``0..m-1`` of the real FFT along the last axis and
    ``-m..m-1`` along the others; neuraloperator 2.0 counts the total along each axis and keeps
    ``n // 2 + 1`` along the last, hence ``(2m, ..., 2m, 2m - 2)``.
    """
    return (2 * modes,) * (ndim - 1) + (2 * modes - 2,)


# --------------------------------------------------------------------------------- models
def build_model(
    kind: str, task: Task, seed: int, rcond: float | None = None
) -> tuple[nn.Module, Any]:
    """The model ``kind`` for ``task``, initialised from ``seed``; returns (model, hooks)."""
    from neuralop.models import FNO

    torch.manual_seed(seed)
    ndim = task.test.y.ndim - 2
    fno = FNO(
        n_modes=fno_modes(task.modes, ndim),
        in_channels=int(task.train.x.shape[1]),
        out_channels=1,
        hidden_channels=task.width,
        positional_embedding=None,
    )
    if kind == "fno":
        return fno, None
    if kind == "output":
        return cl.wrap(fno, *task.bcs, spacing=task.spacing), None
    opts = {} if rcond is None else {"rcond": rcond}  # None: the library's default
    if kind == "refine":
        return cl.wrap(fno, *task.bcs, spacing=task.spacing, mode="refine", **opts), None
    if kind == "scalar_pivot":
        hooks = attach_scalar_pivots(fno, task.bcs)
        return cl.wrap(fno, *task.bcs, spacing=task.spacing), hooks
    if kind == "refine_frozen":
        # the boundary block recomputed at every call but a constant for autograd
        model = cl.wrap(
            fno, *task.bcs, spacing=task.spacing, mode="refine", kernel_grad="detached", **opts
        )
        return model, None
    raise ValueError(f"build_model: unknown model kind {kind!r}; expected one of {ALL_MODELS}.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_model(
    model: nn.Module, task: Task, budget: Budget, seed: int, device: str | torch.device = "cpu"
) -> dict:
    """Adam + step decay on the relative L2 loss; returns the loss curve and epoch timings."""
    device = torch.device(device)
    opt = torch.optim.Adam(model.parameters(), lr=budget.lr, weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=budget.step, gamma=budget.gamma)
    gen = torch.Generator().manual_seed(seed)
    x, y = task.train.x.to(device), task.train.y.to(device)
    n = len(task.train)
    losses: list[float] = []
    seconds: list[float] = []
    diverged = False
    for _ in range(budget.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total, count = 0.0, 0
        _sync(device)
        start = time.perf_counter()
        for i, lo in enumerate(range(0, n, budget.batch_size)):
            if budget.max_batches is not None and i >= budget.max_batches:
                break
            idx = perm[lo : lo + budget.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = cl.metrics.relative_l2(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        sched.step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(total / max(count, 1))
        if not math.isfinite(losses[-1]):
            diverged = True
            break
    return {"train_loss": losses, "epoch_seconds": seconds, "diverged": diverged}


@torch.no_grad()
def predict(
    model: nn.Module, x: Tensor, batch_size: int = 50, device: str | torch.device = "cpu"
) -> Tensor:
    """The model's outputs on ``x`` in batches (eval mode), returned on the CPU."""
    model.eval()
    parts = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(parts)


def per_frame_l2(pred: Tensor, true: Tensor) -> list[float]:
    """Relative L2 per time frame (last axis), averaged over samples."""
    diff = (pred - true).movedim(-1, 1).flatten(2).norm(dim=2)
    ref = true.movedim(-1, 1).flatten(2).norm(dim=2)
    return (diff / ref).mean(dim=0).tolist()


def boundary_errors(y: Tensor, task: Task, inputs: Tensor) -> tuple[list[float], list[float]]:
    """Per wall: the largest and the mean absolute residual of its condition on ``y``."""
    res = cl.functional.boundary_residuals(
        y.detach(),
        task.bcs,
        spacing=task.spacing,
        inputs=inputs,
        include_overridden=False,
    )
    worst = [max(float(r.abs().max()) for r in parts) for parts in res]
    mean = [statistics.fmean(float(r.abs().mean()) for r in parts) for parts in res]
    return worst, mean


def evaluate(pred: Tensor, task: Task) -> dict:
    """Relative L2 (mean over test samples, and per frame) and the boundary errors."""
    true = task.test.y
    rel = cl.metrics.relative_l2(pred, true, reduce=False)
    worst, mean = boundary_errors(pred, task, task.test.x)
    out = {
        "rel_l2": float(rel.mean()),
        "boundary_max": worst,
        "boundary_mean": mean,
        "finite": bool(torch.isfinite(pred).all()),
    }
    if task.frames:
        out["rel_l2_per_frame"] = per_frame_l2(pred, true)
    return out


def diagnostics(kind: str, model: nn.Module, hooks: Any) -> dict:
    """What the corrections report about themselves after training."""
    if kind in ("refine", "refine_frozen"):
        stats = [r.stats for r in model.refinements]
        smin = [min(s.values()) for s in stats if s]
        gaps = [r.t1_gap for r in model.refinements]
        return {
            "kbb_min_relative_singular_value": min(smin) if smin else None,
            "t1_gap_max": max(gaps) if gaps else None,
            "per_layer": [{"stats": s, "t1_gap": g} for s, g in zip(stats, gaps)],
        }
    if kind == "scalar_pivot":
        return {"pivot_clamps": hooks.clamped, "hooked_calls": hooks.calls}
    return {}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n); 0 for one value)."""
    vals = [float(v) for v in values]
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else 0.0
    return m, se


def truth_boundary_error(task: Task) -> list[float]:
    """The boundary residual of the reference data itself (Neumann: the stencil's own error)."""
    return boundary_errors(task.test.y, task, task.test.x)[0]


def run_task(
    task: Task,
    budget: Budget,
    models: Sequence[str] = MODELS,
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    rcond: float | None = None,
) -> tuple[dict, dict[str, Tensor]]:
    """Train and evaluate every model on ``task``; returns (results, seed-0 test predictions).
    ``rcond``: the refined models' regularisation (None: the library's default).

    Seeds are the outer loop and models the inner one, so that load on a shared machine hits
    every model alike.
    """
    per_model: dict[str, list[dict]] = {k: [] for k in models}
    preds: dict[str, Tensor] = {}
    for seed in budget.seeds:
        for kind in models:
            model, hooks = build_model(kind, task, seed, rcond)
            model.to(device)
            log(f"  [{task.name}] seed {seed} {kind:12s} training ...")
            fit = train_model(model, task, budget, seed, device)
            pred = predict(model, task.test.x, budget.eval_batch_size, device)
            res = {"seed": seed, **evaluate(pred, task), **fit}
            res["s_per_epoch"] = statistics.median(fit["epoch_seconds"])
            res["diagnostics"] = diagnostics(kind, model, hooks)
            per_model[kind].append(res)
            if seed == budget.seeds[0]:
                preds[kind] = pred
            log(
                f"  [{task.name}] seed {seed} {kind:12s} rel L2 {res['rel_l2']:.4g}  "
                f"boundary {', '.join(f'{v:.3g}' for v in res['boundary_max'])}  "
                f"{res['s_per_epoch']:.3f} s/epoch" + ("  DIVERGED" if fit["diverged"] else "")
            )
    summary = {}
    for kind, runs in per_model.items():
        m, se = mean_se([r["rel_l2"] for r in runs])
        walls = list(zip(*[r["boundary_max"] for r in runs]))
        summary[kind] = {
            "label": LABELS[kind],
            "rel_l2_mean": m,
            "rel_l2_se": se,
            "boundary_max_mean": [statistics.fmean(w) for w in walls],
            "s_per_epoch_median": statistics.median(r["s_per_epoch"] for r in runs),
            "diverged": any(r["diverged"] for r in runs),
            "runs": runs,
        }
        if task.frames:
            frames = list(zip(*[r["rel_l2_per_frame"] for r in runs]))
            summary[kind]["rel_l2_per_frame_mean"] = [statistics.fmean(f) for f in frames]
    results = {
        "task": task.describe(),
        "budget": asdict(budget) | {"step_size": budget.step},
        "truth_boundary_max": truth_boundary_error(task),
        "models": summary,
    }
    return results, preds


# ------------------------------------------------------------------------------ reporting
def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != 0 else "0"


def markdown_table(results: dict) -> str:
    """One markdown table for one task's results."""
    task = results["task"]
    walls = task["walls"]
    base = results["models"].get("fno", {}).get("rel_l2_mean")
    head = ["model", "rel. L2 mean (SE)", "vs FNO"] + [f"bdry err {w}" for w in walls]
    head.append("s/epoch")
    lines = [
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for kind, r in results["models"].items():
        ratio = f"{base / r['rel_l2_mean']:.2f}x" if base and r["rel_l2_mean"] > 0 else "-"
        if kind == "fno":
            ratio = "1"
        row = [
            r["label"] + (" (diverged)" if r["diverged"] else ""),
            f"{r['rel_l2_mean']:.4g} ({r['rel_l2_se']:.2g})",
            ratio,
            *[_fmt(v) for v in r["boundary_max_mean"]],
            f"{r['s_per_epoch_median']:.3g}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    truth = results.get("truth_boundary_max")
    if truth and any(v > 0 for v in truth):
        row = ["reference data itself", "-", "-", *[_fmt(v) for v in truth], "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def describe_sizes(results: dict) -> str:
    t, b = results["task"], results["budget"]
    grid = " x ".join(f"{v}" for v in t["grid"].values())
    return (
        f"{t['title']}: train/test {t['n_train']}/{t['n_test']}, grid {grid}, "
        f"FNO {t['fno']['modes_paper_convention']} modes width {t['fno']['hidden_channels']}, "
        f"{b['epochs']} epochs, batch {b['batch_size']}, seeds {list(b['seeds'])}"
    )


def environment(device: torch.device) -> dict:
    import neuralop

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "neuraloperator": getattr(neuralop, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "device": name,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def write_results(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=float))


# ------------------------------------------------------------------------------------ CLI
def parse_args(
    description: str, argv: Sequence[str] | None = None, models: Sequence[str] = MODELS
) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="CPU sizes, minutes (default)")
    size.add_argument(
        "--medium",
        action="store_true",
        help="CPU, twice the quick data and about 1.6x its epochs (heat, stokes, burgers and "
        "cavity: about 45 minutes with one thread)",
    )
    size.add_argument("--full", action="store_true", help="the paper's sizes and budget (GPU)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny data, one epoch of one batch: checks that the configuration starts",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="model seeds")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs")
    p.add_argument("--models", nargs="+", choices=ALL_MODELS, default=list(models))
    p.add_argument("--tasks", nargs="+", default=None, help="run only these tasks (names)")
    p.add_argument(
        "--rcond",
        type=float,
        default=None,
        help="rcond of the refined models (default: the library's)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--out", default="out", help="output root (results in <out>/<experiment>/)")
    p.add_argument("--no-figures", action="store_true")
    args = p.parse_args(argv)
    args.size = "full" if args.full else "medium" if args.medium else "quick"
    return args


def adjust_budget(budget: Budget, args: argparse.Namespace) -> Budget:
    """Apply the command-line overrides (seeds, epochs, smoke)."""
    if args.seeds:
        budget.seeds = tuple(args.seeds)
    if args.epochs:
        budget.epochs = args.epochs
    if args.smoke:
        budget.epochs = 1
        budget.max_batches = 1
        budget.seeds = tuple(args.seeds) if args.seeds else (0,)
    return budget


def run_experiment(
    experiment: str,
    make_tasks: Callable[[str, bool], list[tuple[Task, Budget]]],
    figures: Callable[[Task, dict, dict, Path], list[str]] | None,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    models: Sequence[str] = MODELS,
    extra: Callable[[], dict] | None = None,
) -> dict:
    """The body of every experiment script: parse, train, evaluate, write, draw, print.

    ``extra``: called once; what it returns is stored under ``"extra"`` in results.json."""
    args = parse_args(description or experiment, argv, models)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    warnings.filterwarnings("ignore", module="neuralop")
    start = time.perf_counter()
    out_dir = Path(args.out) / experiment
    payload: dict[str, Any] = {
        "experiment": experiment,
        "size": args.size + ("-smoke" if args.smoke else ""),
        "refine_rcond": args.rcond,
        "command": " ".join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)]),
        "environment": environment(device),
        "tasks": {},
    }
    t0 = time.perf_counter()
    tasks = make_tasks(args.size, args.smoke)
    if args.tasks:
        tasks = [(t, b) for t, b in tasks if t.name in args.tasks]
    payload["data_seconds"] = time.perf_counter() - t0
    tables = []
    for task, budget in tasks:
        budget = adjust_budget(budget, args)
        print(f"{task.title}: {len(task.train)} train / {len(task.test)} test", flush=True)
        results, preds = run_task(
            task,
            budget,
            args.models,
            log=lambda s: print(s, flush=True),
            device=device,
            rcond=args.rcond,
        )
        if figures is not None and not args.no_figures:
            results["figures"] = figures(task, results, preds, out_dir)
        payload["tasks"][task.name] = results
        tables.append(f"**{describe_sizes(results)}**\n\n{markdown_table(results)}")
    if extra is not None:
        payload["extra"] = extra()
    payload["wall_seconds"] = time.perf_counter() - start
    write_results(out_dir / "results.json", payload)
    print("\n\n".join(tables))
    print(f"\n{experiment}: {payload['wall_seconds']:.1f} s wall; wrote {out_dir / 'results.json'}")
    return payload
