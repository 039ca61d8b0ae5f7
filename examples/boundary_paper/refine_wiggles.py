"""Where the grid-scale wiggles of the refined Burgers-Dirichlet prediction come from.

    OMP_NUM_THREADS=1 .venv/bin/python examples/boundary_paper/refine_wiggles.py --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python examples/boundary_paper/refine_wiggles.py --threads 1 \
        --size medium --variants fno refine refine_rc1e-1 t1_only t2_only

(about 7 and 15 minutes on one thread.)

Burgers, Dirichlet, single step (the ``--quick`` data of ``burgers.py``: 100 / 50 samples, 128
nodes, FNO 16 modes width 64, 25 epochs). What it measures:

1. Trained models, seeds 0 1 2 (:data:`VARIANTS`): the plain FNO, the output step, the
   refinement at rcond 1e-2 / 1e-1 / 1e-5, and two ablations of the refinement at rcond 1e-2,
   trained with the ablation in the loop: ``t1_only`` (T2 switched off: the layers' inputs are
   not updated, T1 still writes the boundary rows) and ``t2_only`` (T1 switched off: the inputs
   are updated, the layers' boundary rows are left as computed). The ablations are monkeypatched
   here; the library is not changed. Per model, on the test set:

   - ``relL2``: relative L2 error;
   - ``d2 pred``: the roughness of the prediction, rms of its second difference over the nodes
     2 .. N-3 (stencils that do not touch the boundary nodes), in units of u (the truth's value is
     printed for reference);
   - ``err lo / mid / hi``: the error (prediction minus truth) on the nodes 1 .. N-2 split by
     frequency (orthonormal cosine transform) into [0, 8), [8, 16) and [16, 63] periods over the
     domain, each as its norm relative to the truth's norm, per sample, averaged (the FNO's layers
     keep Fourier frequencies 0 .. 15);
   - ``wall/centre``: rms of the error's second difference within 16 nodes of a wall over the
     same in the central half (1: spread uniformly; >> 1: concentrated at the walls);
   - ``flat d2``: the prediction's roughness (as ``d2 pred``) on flat inputs whose truth is
     exactly constant: u0 = c and both boundary values c, for the 50 values c of the test set's
     left boundary values (Burgers keeps u = c).

   The row ``refine, T2 off at test`` is the trained ``refine`` model evaluated with T2 switched
   off (T1 kept): a counterfactual, not a model one would use.

2. Per-layer roughness (forward hooks on the four ``SpectralConv`` layers and the FNO blocks),
   on the test inputs: ``d2/rms`` of each block's output (rms second difference over the
   interior nodes 2 .. N-3, relative to the block output's rms), for the trained models of
   seed 0 and for FRESH (untrained) models of seeds 0 1 2; and for the refined layers, ``ring``:
   the share of the roughness of each layer's interior output that comes from the jump of its
   (updated) boundary inputs, i.e. ``rms d2 L(E_B s) / rms d2 (conv output)`` with ``s`` the
   difference between the boundary input and its linear extrapolation from the two nearest
   interior nodes (``L`` the layer without its bias); ``T2 dv_B/v_B``: the size of T2's update
   of the boundary inputs, rms over the two boundary nodes, all channels and samples, relative
   to the inputs there; ``K_BB smin``: the refinement's own diagnostic (smallest singular value of
   ``K_BB`` over the largest); ``wall/centre`` as above, for the block output.

3. Fresh models on exactly constant inputs (u0, the coordinate channel and both boundary values
   constant): the plain FNO returns a constant to rounding (it is shift invariant), so any
   roughness of the output is made by the refinement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

import burgers
from common import (
    Budget,
    Task,
    build_model,
    predict,
    train_model,
)

import constraint_layers as cl
from constraint_layers.adapters import neuralop as neuralop_adapter
from constraint_layers.boundary.refine import Refinement

#: name -> (model kind, rcond, ablation)
VARIANTS = {
    "fno": ("fno", None, None),
    "output": ("output", None, None),
    "refine": ("refine", 1e-2, None),
    "refine_rc1e-1": ("refine", 1e-1, None),
    "refine_rc1e-5": ("refine", 1e-5, None),
    "t1_only": ("refine", 1e-2, "no_t2"),
    "t2_only": ("refine", 1e-2, "no_t1"),
}

LO, MID = 8, 16  # frequency bands (cycles per domain): [0, 8), [8, 16), [16, N/2]
WALL = 16  # nodes next to each wall in the "wall" window


# ------------------------------------------------------------------------------ ablations
@contextmanager
def ablation(which: str | None):
    """Switch T2 (``"no_t2"``) or T1 (``"no_t1"``) off for the duration (monkeypatch)."""
    if which is None:
        yield
        return
    update, hook = Refinement._update, Refinement.__call__
    if which == "no_t2":

        def _update(self, prep, v, faces, target=None, keep=None):
            update(self, prep, v, faces, target, keep)  # fills `keep` (the faces T1 writes)
            return v

        Refinement._update = _update
    elif which == "no_t1":

        def _call(self, module, args, output):
            hook(self, module, args, output.clone())  # bookkeeping only, result dropped
            return None

        Refinement.__call__ = _call
    else:
        raise ValueError(which)
    try:
        yield
    finally:
        Refinement._update, Refinement.__call__ = update, hook


# -------------------------------------------------------------------------------- measures
def d2(u: Tensor) -> Tensor:
    """Second difference along the last axis over the nodes 2 .. N-3."""
    w = u[..., 1:-1]
    return w[..., 2:] - 2 * w[..., 1:-1] + w[..., :-2]


def rms(u: Tensor) -> float:
    return float(u.double().square().mean().sqrt())


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix (rows: cosines with j / 2 periods over the n nodes)."""
    j = torch.arange(n, dtype=torch.float64)[:, None]
    k = torch.arange(n, dtype=torch.float64)[None, :]
    mat = torch.cos(torch.pi * j * (k + 0.5) / n) * (2.0 / n) ** 0.5
    mat[0] /= 2**0.5
    return mat


def bands(err: Tensor, y: Tensor) -> list[float]:
    """Norm of the error per frequency band over the truth's norm, per sample, averaged.

    On the nodes 1 .. N-2 (the rows a constrained model writes left out), by the orthonormal
    DCT-II (an even extension: no jump at the ends, so no leakage from the error's end values;
    the band norms add up in squares to the error's norm there). DCT index j has j / 2 periods
    over the domain: the bands [0, LO), [LO, MID), [MID, ...) periods are j < 2 LO, 2 LO <= j <
    2 MID, j >= 2 MID.
    """
    err, y = err[..., 1:-1].double(), y[..., 1:-1].double()
    coef = err @ dct_matrix(err.shape[-1]).T
    ref = y.square().sum(-1)
    out = []
    for a, b in ((0, 2 * LO), (2 * LO, 2 * MID), (2 * MID, coef.shape[-1])):
        out.append(float((coef[..., a:b].square().sum(-1) / ref).sqrt().mean()))
    return out


def wall_centre(u: Tensor) -> float:
    """rms second difference within WALL nodes of either wall over the central half's."""
    g = d2(u)  # centres 2 .. N-3
    n = u.shape[-1]
    wall = torch.cat([g[..., : WALL - 2], g[..., -(WALL - 2) :]], -1)
    centre = g[..., n // 4 - 2 : 3 * n // 4 - 2]
    return rms(wall) / rms(centre)


def flat_inputs(task: Task) -> Tensor:
    """Inputs with u0 = c and both boundary values c (c: the test set's left values); the
    coordinate channel kept. The truth is u = c."""
    x = task.test.x.clone()
    c = x[:, 2:3, :1]  # channel 2: the left boundary value broadcast along x
    x[:, 0:1] = c
    x[:, 2:4] = c
    return x


def output_measures(pred: Tensor, task: Task, flat_pred: Tensor) -> dict:
    y = task.test.y
    err = pred - y
    rel = cl.metrics.relative_l2(pred, y, reduce=False)
    lo, mid, hi = bands(err, y)
    return {
        "relL2": float(rel.mean()),
        "d2 pred": rms(d2(pred)),
        "err lo": lo,
        "err mid": mid,
        "err hi": hi,
        "wall/centre": wall_centre(err),
        "flat d2": rms(d2(flat_pred)),
    }


# ------------------------------------------------------------------------------- per layer
class LayerProbe:
    """Forward hooks on the FNO's spectral convolutions and blocks: per layer, the roughness of
    the block output and (refined layers) the share of the conv's roughness due to the jump of
    its boundary inputs."""

    def __init__(self, fno: torch.nn.Module) -> None:
        self.fno = fno
        self.block_out: list[Tensor] = []
        self.ring: list[tuple[float, float]] = []  # (rms d2 ring, rms d2 conv out)
        self.delta: list[float] = []  # |v'_B - v_B| / |v_B|: the size of the T2 update
        self._v: list[Tensor] = []
        self.handles = [fno.fno_blocks.register_forward_hook(self._block)]
        for conv in fno.fno_blocks.convs:
            # prepended: runs before the refinement's pre-hook, sees the input before T2
            self.handles.append(conv.register_forward_pre_hook(self._pre, prepend=True))
            self.handles.append(conv.register_forward_hook(self._conv))

    def _pre(self, module, args):
        self._v.append(args[0].detach())

    def _block(self, module, args, output):
        self.block_out.append(output.detach())

    def _conv(self, module, args, output):
        v = args[0].detach()  # the input as the layer saw it (after T2, if any)
        v0 = self._v.pop()
        ends = [0, -1]
        self.delta.append(rms(v[..., ends] - v0[..., ends]) / rms(v0[..., ends]))
        s = torch.zeros_like(v)
        s[..., 0] = v[..., 0] - (2 * v[..., 1] - v[..., 2])
        s[..., -1] = v[..., -1] - (2 * v[..., -2] - v[..., -3])
        with torch.no_grad():
            ring = module.forward(s) - module.forward(torch.zeros_like(s))
        self.ring.append((rms(d2(ring)), rms(d2(output.detach()))))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def summary(self) -> list[dict]:
        rows = []
        for i, out in enumerate(self.block_out):
            ring, conv = self.ring[i]
            rows.append(
                {
                    "layer": i,
                    "d2/rms": rms(d2(out)) / rms(out),
                    "wall/centre": wall_centre(out),
                    "ring": ring / conv if conv > 0 else float("nan"),
                    "T2 dv_B/v_B": self.delta[i],
                }
            )
        return rows


def probe_layers(model, fno, x: Tensor, ablate: str | None) -> list[dict]:
    probe = LayerProbe(fno)
    try:
        with ablation(ablate), torch.no_grad():
            model.eval()
            model(x)
    finally:
        probe.remove()
    rows = probe.summary()
    refinements = getattr(model, "refinements", [])
    for row, ref in zip(rows, refinements):  # one refinement per spectral convolution, in order
        row["K_BB smin"] = min(ref.stats.values())
    for row in rows[len(refinements) :]:
        row["K_BB smin"] = float("nan")
    return rows


# ------------------------------------------------------------------------------------ task
def dirichlet_task(size: str) -> tuple[Task, Budget]:
    """The Burgers-Dirichlet task of ``burgers.py`` alone (the periodic data is not generated)."""
    return burgers.dirichlet_task(size)


def inner_fno(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", model)


# ------------------------------------------------------------------------------- printing
def table(head: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1))]
    lines[-1] += "|"
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_sd(vals: list[float]) -> str:
    m = statistics.fmean(vals)
    if len(vals) < 2:
        return f"{m:.3g}"
    return f"{m:.3g} ({statistics.stdev(vals):.2g})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--size", choices=("quick", "medium"), default="quick")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    # The layers' updated inputs are observed (and T2 ablated) in the refinement's two-hook
    # path, T2 applied to the layer's input in space; a stock SpectralConv is otherwise
    # refined in one pass from its spectrum, which equals it to rounding
    # (tests/boundary/test_refine_fused.py) but leaves the input as it is.
    stock = neuralop_adapter._stock_forward
    neuralop_adapter._stock_forward = lambda conv: False
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module="neuralop")
            _main(args)
    finally:
        neuralop_adapter._stock_forward = stock


def _main(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    task, budget = dirichlet_task(args.size)
    if args.epochs:
        budget.epochs = args.epochs
    xf = flat_inputs(task)
    y = task.test.y
    print(
        f"{task.title}: {len(task.train)} train / {len(task.test)} test, grid "
        f"{y.shape[-1]}, {budget.epochs} epochs; truth: d2 {rms(d2(y)):.3g}, rms {rms(y):.3g}",
        flush=True,
    )

    # ---- 3. fresh models on constant inputs, and 2. per-layer roughness of fresh models
    const = task.test.x.clone()
    const[:, 1] = 0.5  # the coordinate channel made constant too
    const[:, 0:1] = const[:, 2:3]
    const[:, 3:4] = const[:, 2:3]
    fresh_rows, fresh_layers = [], {}
    for name in args.variants:
        kind, rcond, ablate = VARIANTS[name]
        d2_const, d2_flat, d2_test = [], [], []
        for seed in args.seeds:
            model, _ = build_model(kind, task, seed, rcond)
            with ablation(ablate):
                pc = predict(model, const)
                pf = predict(model, xf)
                pt = predict(model, task.test.x)
            d2_const.append(rms(d2(pc)))
            d2_flat.append(rms(d2(pf)))
            d2_test.append(rms(d2(pt)))
            layers = probe_layers(model, inner_fno(model), task.test.x, ablate)
            fresh_layers.setdefault(name, []).append(layers)
        fresh_rows.append([name, mean_sd(d2_const), mean_sd(d2_flat), mean_sd(d2_test)])
    print("\nFresh (untrained) models, mean (sd) over seeds", args.seeds)
    print(
        table(
            ["model", "d2 out, constant input", "d2 out, flat input", "d2 out, test inputs"],
            fresh_rows,
        ),
        flush=True,
    )

    # ---- 1. trained models
    results: dict[str, list[dict]] = {}
    trained_layers: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name in args.variants:
            kind, rcond, ablate = VARIANTS[name]
            t0 = time.perf_counter()
            model, _ = build_model(kind, task, seed, rcond)
            with ablation(ablate):
                fit = train_model(model, task, budget, seed)
                pred = predict(model, task.test.x)
                flat = predict(model, xf)
            res = output_measures(pred, task, flat)
            res["diverged"] = fit["diverged"]
            results.setdefault(name, []).append(res)
            if seed == args.seeds[0]:
                trained_layers[name] = probe_layers(model, inner_fno(model), task.test.x, ablate)
            if name == "refine":  # the same trained model, T2 switched off at test time only
                with ablation("no_t2"):
                    off = output_measures(predict(model, task.test.x), task, predict(model, xf))
                results.setdefault("refine, T2 off at test", []).append(off)
            print(
                f"  seed {seed} {name:14s} relL2 {res['relL2']:.4g}  d2 {res['d2 pred']:.3g}  "
                f"err hi {res['err hi']:.3g}  flat d2 {res['flat d2']:.3g}  "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    keys = ["relL2", "d2 pred", "err lo", "err mid", "err hi", "wall/centre", "flat d2"]
    rows = [
        [name, *(mean_sd([r[k] for r in runs]) for k in keys)] for name, runs in results.items()
    ]
    print(
        f"\nTrained models ({budget.epochs} epochs), mean (sd) over seeds {args.seeds}; truth: "
        f"d2 {rms(d2(y)):.3g}, flat truth d2 0"
    )
    print(table(["model", *keys], rows))

    # ---- 2. per layer
    keys = ["d2/rms", "ring", "T2 dv_B/v_B", "K_BB smin", "wall/centre"]
    for title, layers in (
        (f"Per layer, fresh models (mean over seeds {args.seeds})", fresh_layers),
        (f"Per layer, trained models (seed {args.seeds[0]})", trained_layers),
    ):
        rows = []
        for name, got in layers.items():
            runs = got if isinstance(got[0], list) else [got]
            for i in range(len(runs[0])):
                rows.append([name, i, *(statistics.fmean(r[i][k] for r in runs) for k in keys)])
        print(f"\n{title}")
        print(table(["model", "layer", *keys], rows))
    print(f"\nrefine_wiggles: {time.perf_counter() - start:.0f} s wall")


if __name__ == "__main__":
    main()
