"""One spectral layer: neuraloperator's forward, the library's evaluation of it, refined.

    .venv/bin/python tests/benchmarks/bench_spectral_layer.py [--repeats 15] [--threads 1]

``mode="refine"`` evaluates a stock ``SpectralConv`` in one pass from its weights (see
``constraint_layers/boundary/refine/``). Its cost against the plain FNO therefore mixes two
things: the refinement (T2 on the spectrum, T1 rows, the boundary blocks rebuilt from the weights
when training) and how the layer's spectral product is computed (neuraloperator: a complex
``einsum``; the library: one real batched product, FFTs on the kept columns only). This script
separates them on one layer of the benchmark models (``bench_boundary.py``):

- ``neuralop``: ``SpectralConv.forward``;
- ``library``: the same layer evaluated by the library's one-pass code with nothing to refine
  (symbol from the weights, box FFT, product, inverse FFT, bias);
- ``refined``: the layer refined inside a wrapper call (Dirichlet on x, Neumann on y in 2D;
  Neumann at both ends in 1D), T2 and T1 included.

Passes: forward (no grad) and forward+backward (weights and input require grad; the symbol and
the boundary blocks are rebuilt at every call, as in training). Calls interleaved, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import constraint_layers as cl
from constraint_layers.adapters.neuralop import spectral_kernel
from constraint_layers.boundary.spectral import symbol_from_kernel

CASES = {
    "1D N=1024, batch 32, width 64": ((16,), 64, (32, 64, 1024), [
        cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]),
    "2D 64x64, batch 8, width 32": ((16, 16), 32, (8, 32, 64, 64), [
        cl.Dirichlet(0.0, dim=0), cl.Neumann(1.0, dim=1, order=3)]),
    "2D 128x128, batch 8, width 32": ((16, 16), 32, (8, 32, 128, 128), [
        cl.Dirichlet(0.0, dim=0), cl.Neumann(1.0, dim=1, order=3)]),
}  # fmt: skip


def _library(conv, v):
    grid = tuple(v.shape[2:])
    kernel = spectral_kernel(conv, grid)
    sym = symbol_from_kernel(kernel)
    out = sym.box_ifft(sym.respond(sym.box_fft(v)))
    return out if kernel.bias is None else out + kernel.bias


def run(repeats: int) -> list[tuple]:
    from neuralop.models import FNO

    rows = []
    for name, (modes, width, shape, bcs) in CASES.items():
        torch.manual_seed(0)
        model = FNO(n_modes=modes, in_channels=1, out_channels=1, hidden_channels=width)
        wrapped = cl.wrap(model, *bcs, mode="refine")
        conv = model.fno_blocks.convs[0]
        v = torch.randn(shape)
        phys = torch.zeros(shape[0], 1, *shape[2:])

        def neuralop(v, conv=conv):
            return type(conv).forward(conv, v)

        def library(v, conv=conv):
            return _library(conv, v)

        def refined(v, conv=conv, wrapped=wrapped, phys=phys):
            with wrapped._context.call(wrapped.bcs, phys):
                return conv(v)

        fns = {"neuralop": neuralop, "library": library, "refined": refined}
        for label in ("forward", "forward+backward"):
            times = {k: [] for k in fns}
            for i in range(repeats + 2):
                for k, fn in fns.items():
                    vi = v.clone().requires_grad_(label != "forward")
                    t0 = time.perf_counter()
                    if label == "forward":
                        with torch.no_grad():
                            fn(vi)
                    else:
                        fn(vi).square().mean().backward()
                    if i >= 2:  # warm-up
                        times[k].append(time.perf_counter() - t0)
            med = {k: statistics.median(t) * 1e3 for k, t in times.items()}
            rows.append((name, label, med))
        cl.unwrap(wrapped)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; one layer, ms (median)")
    print(
        f"{'case':32s} {'pass':17s} {'neuralop':>9s} {'library':>9s} {'refined':>9s} "
        f"{'lib/nop':>8s} {'ref/nop':>8s} {'ref/lib':>8s}"
    )
    for name, label, m in rows:
        a, b, c = m["neuralop"], m["library"], m["refined"]
        print(
            f"{name:32s} {label:17s} {a:9.2f} {b:9.2f} {c:9.2f} {b / a:8.2f} {c / a:8.2f} "
            f"{c / b:8.2f}"
        )


if __name__ == "__main__":
    main()
