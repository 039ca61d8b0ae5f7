"""Joint T2 against the library's block-Jacobi T2 of the kernel refinement, trained (cavity).

The library's refinement (``cl.wrap(fno, *bcs, mode="refine")``) updates every Fourier layer's
boundary inputs (T2) axis by axis from the same residual (block Jacobi) and then writes the
boundary rows (T1). This script builds, for the experiment only, a JOINT T2: one regularised
solve over the whole boundary frame (every face of every constrained axis together),

    v'_F = v_F + K_FF^+ (v_F - (L v)_F),   K_FF^+ = (K^H K + lam^2 I)^{-1} K^H,

with ``F`` the frame nodes (x faces and y faces, every time frame) and ``L`` the layer's linear
part. The layer is a circular convolution, so ``K_FF[p, q] = G(p - q mod grid)`` with ``G`` the
inverse FFT of the layer's symbol (closed form from the weights: ``symbol_from_kernel`` of
``spectral_kernel``); along the unconstrained axis t it stays shift invariant, so ``K_FF`` is one
dense ``(#frame nodes in x, y) * C`` block per t-frequency of ``rfft`` (the zero and Nyquist
blocks are real). ``lam = rcond`` times the largest Frobenius norm of the per-frequency blocks the
LIBRARY factorises (those of each axis on its own, per tangential frequency), so that both
variants damp with the same ``lam`` and, on one constrained axis, coincide. Gradients are exact
(through the Cholesky-based solve and ``lam``, in the autograd graph) at every step, as the
library's. T1 is the library's: each face's output rows = the face's inputs + the layer's bias.
The joint T2 runs as a forward pre-hook + forward hook pair on each ``model.fno_blocks.convs``
of a model wrapped with the output step only (``cl.wrap(fno, *bcs)``), which is what
``mode="refine"`` adds its hooks to.

It first checks the joint T2 on fresh layers (float64): the symbol's response equals the layer's
own; with ``rcond=0`` the frame residual ``(L v')_F - v_F`` after the joint T2 is at rounding;
on one constrained axis the joint T2 equals the library's (``rcond`` default). Then it trains, on
the same data, budget and seeds, the plain FNO, the library's refinement (block Jacobi) and the
joint refinement, and reports the test relative L2 (mean and standard error over the seeds), the
training time, and on the trained models the boundary residual ratio per refined layer,
``||(L v')_F - v_F|| / ||(L v)_F - v_F||`` per test sample (mean over the test set), over the
whole frame, for both T2s.

    OMP_NUM_THREADS=1 .venv/bin/python examples/boundary_paper/refine_joint.py --quick --threads 1
    OMP_NUM_THREADS=1 .venv/bin/python examples/boundary_paper/refine_joint.py --medium --threads 1

(``--skip-checks`` leaves the fresh-layer checks out; ``--rcond R`` sets both refinements'
``rcond``; ``--out FILE`` writes every run as JSON.) Quick: about 11 minutes with one thread
(the joint model about 7x the library's time per step), medium about 35. Results in
``RESULTS.md``, "Joint T2 vs block Jacobi (trained)".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import cavity
from _models import complex128_spectral, fno
from common import build_model, evaluate, mean_se, predict, train_model

import constraint_layers as cl
from constraint_layers.adapters import neuralop as neuralop_adapter
from constraint_layers.adapters.neuralop import spectral_kernel
from constraint_layers.boundary.spectral import Symbol, symbol_from_kernel

MODELS = ("fno", "refine", "joint")
LABELS = {
    "fno": "FNO",
    "refine": "FNO + refine, block-Jacobi T2 (library)",
    "joint": "FNO + refine, joint T2 (this script)",
}


# --------------------------------------------------------------------------- the joint T2
class _TikhonovSolve(torch.autograd.Function):
    """``X = (K^H K + lam2 I)^{-1} K^H R`` per batch entry, differentiable in ``K``, ``lam2``
    and ``R``. The Cholesky factor of ``K^H K + lam2 I`` is computed once (no autograd); with
    ``Y = (K^H K + lam2 I)^{-1} dX``: ``dR = K Y``, ``dK = (R - K X) Y^H - (K Y) X^H``,
    ``d lam2 = -Re sum(Y conj(X))``. Shapes: K (T, N, N), R (T, N, B), real or complex."""

    @staticmethod
    def forward(ctx, k: Tensor, lam2: Tensor, rhs: Tensor) -> Tensor:
        kh = k.mH.contiguous()  # a contiguous operand: one batched product, no per-matrix copies
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        chol = torch.linalg.cholesky(kh @ k + lam2 * eye)
        x = torch.cholesky_solve(kh @ rhs, chol)
        ctx.save_for_backward(k, lam2, rhs, chol, x)
        return x

    @staticmethod
    def backward(ctx, dx: Tensor):
        k, lam2, rhs, chol, x = ctx.saved_tensors
        y = torch.cholesky_solve(dx.contiguous(), chol)
        ky = k @ y
        # [R - K X, -K Y] @ [Y, X]^H: one product
        dk = torch.cat([rhs - k @ x, -ky], -1) @ torch.cat([y, x], -1).mH.contiguous()
        dlam = -(y * x.conj()).real.sum().to(lam2.dtype)
        return dk, dlam, ky


def frame(grid: tuple[int, ...], axes: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The frame nodes (x, y) of the constrained ``axes`` (of the first two): both ends of each,
    in lexicographic order. Returns two int64 tensors (x indices, y indices)."""
    nx, ny = grid[0], grid[1]
    pts = [
        (i, j)
        for i in range(nx)
        for j in range(ny)
        if (0 in axes and i in (0, nx - 1)) or (1 in axes and j in (0, ny - 1))
    ]
    return torch.tensor([p[0] for p in pts]), torch.tensor([p[1] for p in pts])


def symbol_of(conv, grid: tuple[int, ...]) -> tuple[Symbol, Tensor]:
    """The layer's symbol (closed form) and its dense half spectrum in float64 precision."""
    sym = symbol_from_kernel(spectral_kernel(conv, grid))
    return sym, sym.dense().to(torch.complex128)  # (C_in, C_out, X, Y, T // 2 + 1)


def apply_linear(h: Tensor, v: Tensor) -> Tensor:
    """``L v`` from the dense symbol: ``irfftn(H . rfftn(v))`` in float64."""
    grid = tuple(v.shape[2:])
    dims = tuple(range(2, v.ndim))
    spec = torch.fft.rfftn(v.to(torch.float64), dim=dims)
    return torch.fft.irfftn(torch.einsum("bi...,io...->bo...", spec, h), s=grid, dim=dims)


def frame_kernel(h: Tensor, fx: Tensor, fy: Tensor) -> Tensor:
    """``K_FF`` per t-frequency: (T // 2 + 1, nF C, nF C), rows (node, output channel),
    columns (node, input channel). ``G`` = inverse DFT of the symbol over x and y."""
    c = h.shape[0]
    g = torch.fft.ifftn(h, dim=(2, 3))  # (C_in, C_out, X, Y, Tr)
    g = g.permute(4, 2, 3, 1, 0)  # (Tr, X, Y, C_out, C_in)
    dx = (fx[:, None] - fx[None, :]) % h.shape[2]
    dy = (fy[:, None] - fy[None, :]) % h.shape[3]
    k = g[:, dx, dy]  # (Tr, nF, nF, C_out, C_in)
    n = fx.shape[0]
    return k.permute(0, 1, 3, 2, 4).reshape(k.shape[0], n * c, n * c)


def library_lam2(sym: Symbol, axes: tuple[int, ...], rcond: float) -> Tensor:
    """``rcond^2`` times the largest squared Frobenius norm of the per-frequency ``K_BB`` blocks
    that the library factorises (each constrained axis on its own), over all axes."""
    norms = []
    for a in axes:
        kbb = sym.boundary_block(a, (0, sym.grid[a] - 1)).to(torch.complex128)
        norms.append(torch.view_as_real(kbb).square().sum(dim=(-3, -2, -1)).amax())
    return rcond**2 * torch.stack(norms).amax()


def joint_delta(
    sym: Symbol, h: Tensor, v: Tensor, axes: tuple[int, ...], rcond: float
) -> tuple[Tensor, Tensor, Tensor]:
    """The joint T2 update on the frame: ``delta_F = K_FF^+ (v_F - (L v)_F)``, float64.

    Returns (delta, fx, fy); delta has shape (B, C, nF, T)."""
    grid = tuple(v.shape[2:])
    fx, fy = frame(grid, axes)
    fx, fy = fx.to(v.device), fy.to(v.device)
    b, c, t = v.shape[0], v.shape[1], grid[2]
    lv = apply_linear(h, v)
    r = v.to(torch.float64)[:, :, fx, fy] - lv[:, :, fx, fy]  # (B, C, nF, T)
    rf = torch.fft.rfft(r, dim=-1)  # (B, C, nF, Tr)
    n = fx.shape[0]
    rhs = rf.permute(3, 2, 1, 0).reshape(rf.shape[-1], n * c, b)  # (Tr, nF C, B)
    k = frame_kernel(h, fx, fy)
    real = [0] + ([t // 2] if t % 2 == 0 else [])  # the t-frequencies whose block is real
    cplx = [j for j in range(k.shape[0]) if j not in real]
    if rcond == 0:
        sol = torch.linalg.pinv(k) @ rhs
    else:
        lam2 = library_lam2(sym, axes, rcond)
        parts = {}
        xr = _TikhonovSolve.apply(k[real].real.contiguous(), lam2, rhs[real].real.contiguous())
        xc = _TikhonovSolve.apply(k[cplx].contiguous(), lam2, rhs[cplx].contiguous())
        for j, x in zip(real, xr):
            parts[j] = x.to(torch.complex128)
        for j, x in zip(cplx, xc):
            parts[j] = x
        sol = torch.stack([parts[j] for j in range(k.shape[0])])
    d = sol.reshape(-1, n, c, b).permute(3, 2, 1, 0)  # (B, C, nF, Tr)
    return torch.fft.irfft(d, n=t, dim=-1), fx, fy


class JointRefinement:
    """Forward pre-hook (joint T2) and forward hook (T1) of one neuraloperator SpectralConv.

    ``axes``: the constrained axes (both ends each, Dirichlet/Neumann elimination); the layer
    runs on the physical grid (no domain padding). ``record``: keep, per call, the frame residual
    ratio ``||(L v')_F - v_F|| / ||(L v)_F - v_F||`` per sample (no gradients; diagnostics)."""

    def __init__(self, conv, axes: tuple[int, ...], rcond: float = 1e-2) -> None:
        self.conv, self.axes, self.rcond = conv, axes, rcond
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.record = False
        self.ratios: list[Tensor] = []
        self.handles = [
            conv.register_forward_pre_hook(self.before),
            conv.register_forward_hook(self.after),
        ]

    def before(self, module, args):
        v = args[0]
        sym, h = symbol_of(self.conv, tuple(v.shape[2:]))
        delta, fx, fy = joint_delta(sym, h, v, self.axes, self.rcond)
        self.pending.append((v, fx, fy))
        out = v.clone()
        out[:, :, fx, fy] = out[:, :, fx, fy] + delta.to(v.dtype)
        if self.record:
            with torch.no_grad():
                self.ratios.append(residual_ratio(h.detach(), v.detach(), out.detach(), fx, fy))
        return (out, *args[1:])

    def after(self, module, args, output):
        v, fx, fy = self.pending.pop()
        rows = v[:, :, fx, fy]
        if self.conv.bias is not None:
            rows = rows + self.conv.bias.reshape(1, -1, 1, 1).to(rows.dtype)
        out = output.clone()
        out[:, :, fx, fy] = rows
        return out


def residual_ratio(h: Tensor, v: Tensor, v2: Tensor, fx: Tensor, fy: Tensor) -> Tensor:
    """``||(L v2)_F - v_F|| / ||(L v)_F - v_F||`` per sample over the frame (all channels and
    t), float64."""
    vf = v.to(torch.float64)[:, :, fx, fy]
    before = (apply_linear(h, v)[:, :, fx, fy] - vf).flatten(1).norm(dim=1)
    after = (apply_linear(h, v2)[:, :, fx, fy] - vf).flatten(1).norm(dim=1)
    return after / before


class LibraryRecorder:
    """Records the frame residual ratio of the library's T2 on one refined conv: a pre-hook
    before the library's (the layer input ``v``) and one after it (the updated ``v'``)."""

    def __init__(self, conv, axes: tuple[int, ...]) -> None:
        self.conv, self.axes = conv, axes
        self.ratios: list[Tensor] = []
        self.v: Tensor | None = None
        self.handles = [
            conv.register_forward_pre_hook(self.first, prepend=True),
            conv.register_forward_pre_hook(self.last),
        ]

    def first(self, module, args):
        self.v = args[0].detach()

    def last(self, module, args):
        v2 = args[0].detach()
        with torch.no_grad():
            _, h = symbol_of(self.conv, tuple(v2.shape[2:]))
            fx, fy = frame(tuple(v2.shape[2:]), self.axes)
            self.ratios.append(residual_ratio(h, self.v, v2, fx, fy))

    def remove(self) -> None:
        for hd in self.handles:
            hd.remove()


# ------------------------------------------------------------------------------- checks
def _fresh_fno(seed: int, width: int = 20, in_channels: int = 9):
    """The cavity's FNO (8 modes, width 20), freshly initialised, in float64."""
    torch.manual_seed(seed)
    return fno(
        (16, 16, 14),
        in_channels=in_channels,
        hidden=width,
        dtype=torch.float64,
        positional_embedding=None,
    )


@contextmanager
def two_hook_path():
    """The library's refinement with T2 applied to each layer's input in space, so that the
    pre-hooks here observe the updated input ``v'``. A stock ``SpectralConv`` is otherwise
    refined in one pass from its spectrum (equal to rounding,
    ``tests/boundary/test_refine_fused.py``), which leaves the input as it is."""
    stock = neuralop_adapter._stock_forward
    neuralop_adapter._stock_forward = lambda conv: False
    try:
        yield
    finally:
        neuralop_adapter._stock_forward = stock


def verify(grid: tuple[int, ...] = (12, 12, 8)) -> dict:
    """Checks of the joint T2 on a fresh (untrained) layer, float64 (the layer computing in
    complex128)."""
    with complex128_spectral(), two_hook_path():
        return _verify(grid)


def _verify(grid: tuple[int, ...]) -> dict:
    out = {}
    fno = _fresh_fno(0)
    conv = fno.fno_blocks.convs[0]
    c = conv.bias.shape[0]
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(2, c, *grid, generator=gen, dtype=torch.float64)
    bias = conv.bias.reshape(1, -1, 1, 1, 1)
    with torch.no_grad():
        sym, h = symbol_of(conv, grid)
        # 1. the symbol's response is the layer's (L v = conv(v) - bias)
        lv = apply_linear(h, v)
        ref = conv(v) - bias
        out["symbol_vs_layer"] = float((lv - ref).abs().max() / ref.abs().max())
        # and K_FF against the layer's response to an impulse at a frame node
        fx, fy = frame(grid, (0, 1))
        k = frame_kernel(h, fx, fy)  # (Tr, nF C, nF C)
        q, i, t0 = 5, 3, 2  # frame node, input channel, frame time
        e = torch.zeros(1, c, *grid, dtype=torch.float64)
        e[0, i, fx[q], fy[q], t0] = 1.0
        resp = (conv(e) - bias)[0][:, fx, fy]  # (C_out, nF, T)
        col = k[:, :, q * c + i].reshape(k.shape[0], -1, c)  # (Tr, nF, C_out)
        phase = torch.exp(
            -2j * torch.pi * torch.arange(k.shape[0], dtype=torch.float64) * t0 / grid[2]
        )
        pred = torch.fft.irfft(col.permute(2, 1, 0) * phase, n=grid[2], dim=-1)
        out["kernel_vs_impulse"] = float((pred - resp).abs().max() / resp.abs().max())
        # 2. with rcond = 0 the joint T2 removes the frame residual
        delta, fx, fy = joint_delta(sym, h, v, (0, 1), 0.0)
        v2 = v.clone()
        v2[:, :, fx, fy] += delta
        lv2 = conv(v2) - bias
        res0 = (lv[:, :, fx, fy] - v[:, :, fx, fy]).norm()
        res1 = (lv2[:, :, fx, fy] - v[:, :, fx, fy]).norm()
        out["joint_rcond0_residual_ratio"] = float(res1 / res0)
        out["joint_rcond0_cond"] = float(torch.linalg.cond(k).max())
        # ... and the library's block Jacobi on the same layer (rcond 0 and default)
    for rcond in (0.0, 1e-2):
        out[f"library_rcond{rcond:g}_residual_ratio"] = _library_ratio(grid, v, (0, 1), rcond)
        with torch.no_grad():
            delta, fx, fy = joint_delta(sym, h, v, (0, 1), rcond)
            v2 = v.clone()
            v2[:, :, fx, fy] += delta
            out[f"joint_rcond{rcond:g}_residual_ratio"] = float(
                residual_ratio(h, v, v2, fx, fy).mean()
            )
    # 3. one constrained axis: the joint T2 is the library's T2 (rcond default), both axes
    for axis in (0, 1):
        lib = _library_update(grid, v, (axis,), 1e-2)
        with torch.no_grad():
            delta, fx, fy = joint_delta(sym, h, v, (axis,), 1e-2)
            mine = v.clone()
            mine[:, :, fx, fy] += delta
        out[f"one_axis_{axis}_joint_vs_library"] = float(
            (mine - lib).abs().max() / (lib - v).abs().max()
        )
    # 4. gradients of the joint solve (float64, small): autograd's gradcheck
    kk = torch.randn(2, 6, 6, dtype=torch.complex128, requires_grad=True)
    rr = torch.randn(2, 6, 3, dtype=torch.complex128, requires_grad=True)
    ll = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out["gradcheck_complex"] = bool(torch.autograd.gradcheck(_TikhonovSolve.apply, (kk, ll, rr)))
    kk = torch.randn(2, 6, 6, dtype=torch.float64, requires_grad=True)
    rr = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    out["gradcheck_real"] = bool(torch.autograd.gradcheck(_TikhonovSolve.apply, (kk, ll, rr)))
    return out


def _library_update(grid, v: Tensor, axes: tuple[int, ...], rcond: float) -> Tensor:
    """The library's T2 output ``v'`` on the first conv of the same fresh FNO (float64)."""
    fno = _fresh_fno(0)
    bcs = [cl.Dirichlet(0.0, dim=a, side=s) for a in axes for s in ("low", "high")]
    model = cl.wrap(fno, *bcs, mode="refine", rcond=rcond)
    conv = fno.fno_blocks.convs[0]
    seen = {}
    hd = conv.register_forward_pre_hook(lambda m, a: seen.setdefault("v2", a[0].detach()))
    x = torch.randn(v.shape[0], 9, *grid, dtype=torch.float64)
    # feed `v` to the conv: replace the lifting's output by a pre-hook placed first
    hv = conv.register_forward_pre_hook(lambda m, a: (v, *a[1:]), prepend=True)
    with torch.no_grad():
        model(x)
    hd.remove()
    hv.remove()
    return seen["v2"]


def _library_ratio(grid, v: Tensor, axes: tuple[int, ...], rcond: float) -> float:
    v2 = _library_update(grid, v, axes, rcond)
    conv = _fresh_fno(0).fno_blocks.convs[0]
    with torch.no_grad():
        _, h = symbol_of(conv, grid)
        fx, fy = frame(grid, axes)
        return float(residual_ratio(h, v, v2, fx, fy).mean())


# ------------------------------------------------------------------------------ training
def build(kind: str, task, seed: int, rcond: float):
    """(model, recorders): ``joint`` is the output-step wrapper plus the joint hooks."""
    axes = (0, 1)
    if kind == "joint":
        model, _ = build_model("output", task, seed)
        recs = [JointRefinement(conv, axes, rcond) for conv in model.model.fno_blocks.convs]
        return model, recs
    model, _ = build_model(kind, task, seed, rcond)
    return model, []


def layer_ratios(kind: str, model, recs, x: Tensor, batch: int) -> list[float] | None:
    """Mean frame residual ratio per refined layer on ``x`` (eval mode, no gradients)."""
    if kind == "fno":
        return None
    if kind == "refine":
        recs = [LibraryRecorder(conv, (0, 1)) for conv in model.model.fno_blocks.convs]
    for r in recs:
        r.ratios, r.record = [], True
    predict(model, x, batch)
    out = [float(torch.cat(r.ratios).mean()) for r in recs]
    for r in recs:
        r.record = False
        if kind == "refine":
            r.remove()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="cavity --quick sizes (default)")
    size.add_argument("--medium", action="store_true", help="cavity --medium sizes")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--rcond", type=float, default=1e-2, help="rcond of both refinements")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs")
    p.add_argument("--skip-checks", action="store_true", help="skip the fresh-layer checks")
    p.add_argument("--out", default=None, help="write the results as JSON to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with warnings.catch_warnings(), two_hook_path():
        warnings.filterwarnings("ignore", module="neuralop")
        return _main(args)


def _main(args: argparse.Namespace) -> dict:
    size = "medium" if args.medium else "quick"
    payload: dict = {"size": size, "rcond": args.rcond, "seeds": args.seeds}
    if not args.skip_checks:
        t0 = time.perf_counter()
        payload["checks"] = verify()
        print(f"checks ({time.perf_counter() - t0:.1f} s):", flush=True)
        for key, val in payload["checks"].items():
            print(f"  {key}: {val:.3g}" if isinstance(val, float) else f"  {key}: {val}")
    (task, budget), *_ = cavity.make_tasks(size, False)
    if args.epochs:
        budget.epochs = args.epochs
    budget.seeds = tuple(args.seeds)
    print(
        f"{task.title}: {len(task.train)} train / {len(task.test)} test, grid "
        f"{tuple(task.test.y.shape[2:])}, {budget.epochs} epochs, batch {budget.batch_size}",
        flush=True,
    )
    runs: dict[str, list[dict]] = {k: [] for k in args.models}
    for seed in args.seeds:  # seeds outer, models inner: load on the machine hits all alike
        for kind in args.models:
            model, recs = build(kind, task, seed, args.rcond)
            t0 = time.perf_counter()
            fit = train_model(model, task, budget, seed)
            wall = time.perf_counter() - t0
            pred = predict(model, task.test.x, budget.eval_batch_size)
            res = evaluate(pred, task)
            steps = budget.epochs * -(-len(task.train) // budget.batch_size)
            ratios = layer_ratios(kind, model, recs, task.test.x, budget.eval_batch_size)
            row = {
                "seed": seed,
                "rel_l2": res["rel_l2"],
                "boundary_max": res["boundary_max"],
                "train_seconds": wall,
                "s_per_step": sum(fit["epoch_seconds"]) / steps,
                "diverged": fit["diverged"],
                "train_loss": fit["train_loss"],
                "residual_ratio_per_layer": ratios,
            }
            runs[kind].append(row)
            extra = "" if ratios is None else "  ratios " + " ".join(f"{r:.3g}" for r in ratios)
            print(
                f"  seed {seed} {kind:7s} rel L2 {row['rel_l2']:.4g}  train {wall:.1f} s "
                f"({row['s_per_step']:.3f} s/step){extra}",
                flush=True,
            )
    payload["runs"] = runs
    print(table(runs, task, budget))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(payload, indent=1, default=float))
    return payload


def table(runs: dict, task, budget) -> str:
    base = statistics.fmean(r["rel_l2"] for r in runs["fno"]) if "fno" in runs else None
    lines = [
        f"**{task.title}: train/test {len(task.train)}/{len(task.test)}, grid "
        f"{' x '.join(str(s) for s in task.test.y.shape[2:])}, {budget.epochs} epochs, batch "
        f"{budget.batch_size}, seeds {list(budget.seeds)}**",
        "",
        "| model | rel. L2 mean (SE) | vs FNO | train s/model (mean) | s/step | residual ratio "
        "per layer (mean over seeds) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for kind, rows in runs.items():
        m, se = mean_se([r["rel_l2"] for r in rows])
        ratio = f"{base / m:.2f}x" if base else "-"
        per = [r["residual_ratio_per_layer"] for r in rows]
        per_s = "-"
        if per[0] is not None:
            per_s = ", ".join(f"{statistics.fmean(x):.3g}" for x in zip(*per))
        wall = statistics.fmean(r["train_seconds"] for r in rows)
        step = statistics.fmean(r["s_per_step"] for r in rows)
        div = " (diverged)" if any(r["diverged"] for r in rows) else ""
        lines.append(
            f"| {LABELS[kind]}{div} | {m:.4g} ({se:.2g}) | {ratio} | {wall:.1f} | {step:.3f} | "
            f"{per_s} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
