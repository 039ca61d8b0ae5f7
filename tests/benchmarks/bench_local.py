"""Speed of the local (divergence-free) constraints.

1. A training step (forward + backward) of a 2D FNO (128^2, width 32, batch 8) plain, with
   ``cl.DivergenceFree(periodic=True)`` and with ``cl.DivergenceFree()`` (walls), and with
   no-slip walls; measured interleaved, ratios to the plain step (targets: <= 1.10x periodic,
   <= 1.3x walls).
2. The projection alone against the grid size: periodic 64^2 -> 256^2, walls 33^2 -> 129^2
   (the time ratio next to the ``N log N`` ratio).
3. Gaussian conditioning with a diagonal variance (contrast 10): time and CG iterations at 64^2,
   128^2, 256^2 (iterations should not grow with N).

Run (not collected by pytest; on an idle machine, GPU if there is one)::

    .venv/bin/python tests/benchmarks/bench_local.py            # the full table
    .venv/bin/python tests/benchmarks/bench_local.py --quick    # smaller sizes
    .venv/bin/python tests/benchmarks/bench_local.py --profile  # where a step's time goes
    .venv/bin/python tests/benchmarks/bench_local.py --dct      # the DCT fast solve forced
    .venv/bin/python tests/benchmarks/bench_local.py --iterations  # + CG counts by variance/walls

``--profile`` (no timing table): per constrained FNO step, the CG iterations of each local solve
and the share of the step's CPU time spent in ``constraint_layers`` (cProfile, cumulative time of
the layer's ``project``): shares and counts, meaningful on a loaded machine too.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import constraint_layers as cl
from constraint_layers.local import solve

F64 = torch.float64


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def fno_steps(args, device) -> None:
    from neuralop.models import FNO

    n, width, batch = args.size, args.width, args.batch
    torch.manual_seed(0)
    net = FNO(n_modes=(16, 16), hidden_channels=width, in_channels=1, out_channels=2).to(device)
    x = torch.randn(batch, 1, n, n, device=device)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    models = {
        "plain": net,
        "periodic": cl.wrap(net, cl.DivergenceFree(periodic=True)),
        "walls": cl.wrap(net, cl.DivergenceFree()),
        "no-slip": cl.wrap(net, cl.DivergenceFree(), *walls),
    }

    def step(model):
        net.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    for m in models.values():  # warm-up (caches, kernels)
        step(m)
    times = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved
        for k, m in models.items():
            times[k] += timed(lambda m=m: step(m), device, 1)
    base = min(times["plain"])
    print(f"FNO step {n}^2, width {width}, batch {batch} ({device}): best of {args.repeats}")
    for k, t in times.items():
        print(f"  {k:9s} {min(t) * 1e3:9.2f} ms   {min(t) / base:5.2f}x plain")


def profile(args, device) -> None:
    import cProfile
    import pstats

    from neuralop.models import FNO

    n, width, batch = args.size, args.width, args.batch
    torch.manual_seed(0)
    net = FNO(n_modes=(16, 16), hidden_channels=width, in_channels=1, out_channels=2).to(device)
    x = torch.randn(batch, 1, n, n, device=device)
    walls = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    models = {
        "periodic": cl.wrap(net, cl.DivergenceFree(periodic=True)),
        "walls": cl.wrap(net, cl.DivergenceFree()),
        "no-slip": cl.wrap(net, cl.DivergenceFree(), *walls),
    }
    iterations: list[int] = []
    orig = solve.pcg

    def counting(*a, **k):
        out = orig(*a, **k)
        iterations.append(out[2])
        return out

    def step(model):
        net.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    solve.pcg = counting
    try:
        print(f"profile: FNO step {n}^2, width {width}, batch {batch} ({device})")
        for k, m in models.items():
            step(m)  # warm-up: caches (fast solves, capacitance) are built here
            iterations.clear()
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.repeats):
                step(m)
            prof.disable()
            stats = pstats.Stats(prof).stats
            total = sum(v[2] for v in stats.values())  # own time of every function
            proj = sum(v[3] for key, v in stats.items() if key[2] == "project"
                       and "constraint_layers" in key[0])  # fmt: skip
            back = sum(v[3] for key, v in stats.items() if key[2] == "backward"
                       and "constraint_layers/local" in key[0])  # fmt: skip
            per = iterations[: len(iterations) // args.repeats]
            print(
                f"  {k:9s} forward projection {proj / total:6.1%} of the step, its backward "
                f"{back / total:6.1%}; CG iterations per solve {per}"
            )
    finally:
        solve.pcg = orig


def scaling(args, device) -> None:
    print("projection alone (batch 8, float32)")
    no_slip = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    for label, con, sizes, bcs in (
        ("periodic", cl.DivergenceFree(periodic=True), args.periodic_sizes, ()),
        ("walls", cl.DivergenceFree(), args.wall_sizes, ()),
        ("no-slip", cl.DivergenceFree(), args.wall_sizes, no_slip),
    ):
        best = []
        for n in sizes:
            u = torch.randn(8, 2, n, n, device=device)
            run = lambda u=u, c=con, b=bcs: cl.functional.enforce_local(u, c, *b)  # noqa: E731
            run()  # set-up (cached fast solves)
            best.append(min(timed(run, device, 5)))
        n0, n1 = sizes[0], sizes[-1]
        nlogn = (n1 * n1 * math.log(n1 * n1)) / (n0 * n0 * math.log(n0 * n0))
        print(
            f"  {label:8s} {n0}^2: {best[0] * 1e3:8.2f} ms  {n1}^2: {best[-1] * 1e3:8.2f} ms  "
            f"ratio {best[-1] / best[0]:6.1f} (N log N ratio {nlogn:6.1f}, N^3 ratio "
            f"{(n1 / n0) ** 6:9.0f})"
        )


def gaussian(args, device) -> None:
    iterations: list[int] = []
    orig = solve.pcg

    def counting(*a, **k):
        x, res, it = orig(*a, **k)
        iterations.append(it)
        return x, res, it

    solve.pcg = counting
    try:
        print("Gaussian conditioning, diagonal variance (contrast 10), batch 1, float64")
        for n in args.gaussian_sizes:
            g = torch.Generator(device="cpu").manual_seed(0)
            m = torch.randn(1, 2, n, n, dtype=F64, generator=g).to(device)
            v = (1 + 9 * torch.rand(1, 2, n, n, dtype=F64, generator=g)).to(device)
            for label, con in (
                ("periodic", cl.DivergenceFree(periodic=True)),
                ("walls", cl.DivergenceFree()),
            ):
                iterations.clear()
                run = lambda m=m, v=v, c=con: cl.functional.condition_local(m, v, c)  # noqa: E731
                t = min(timed(run, device, 3))
                print(f"  {n}^2 {label:8s} {t * 1e3:9.2f} ms   CG iterations {iterations[-1]}")
        if args.iterations:
            _iteration_table(args, device, iterations)
    finally:
        solve.pcg = orig


def _variance(kind: str, contrast: float, n: int, g: torch.Generator) -> torch.Tensor:
    """Variances in ``[1, contrast]``: i.i.d. uniform, or a smooth field."""
    if kind == "iid":
        return 1 + (contrast - 1) * torch.rand(1, 2, n, n, dtype=F64, generator=g)
    x = torch.linspace(0, 1, n, dtype=F64)
    s = 0.5 + 0.5 * torch.sin(2 * math.pi * x)[:, None] * torch.cos(2 * math.pi * x)[None, :]
    return (1 + (contrast - 1) * s).expand(1, 2, n, n)


def _iteration_table(args, device, iterations: list[int]) -> None:
    """CG iterations of the Gaussian conditioning (no timings): variance kind and contrast,
    walls of each kind, against the grid size."""
    neumann = (cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1))
    no_slip = (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))
    cases = (
        ("periodic", cl.DivergenceFree(periodic=True), ()),
        ("walls", cl.DivergenceFree(), ()),
        ("no-slip", cl.DivergenceFree(), no_slip),
        ("Neumann", cl.DivergenceFree(), neumann),
    )
    sizes = args.gaussian_sizes
    print(f"CG iterations, Gaussian conditioning (diagonal variance), n = {sizes}")
    for kind in ("iid", "smooth"):
        for contrast in (10.0, 100.0):
            for label, con, walls in cases:
                counts = []
                for n in sizes:
                    g = torch.Generator(device="cpu").manual_seed(0)
                    m = torch.randn(1, 2, n, n, dtype=F64, generator=g).to(device)
                    v = _variance(kind, contrast, n, g).to(device)
                    iterations.clear()
                    try:
                        cl.functional.condition_local(m, v, con, *walls)
                    except cl.errors.IncompatibleConstraintsError:
                        counts.append("no convergence")  # CG's MAXITER: the error says so
                        continue
                    counts.append(max(iterations) if iterations else 0)
                print(f"  {kind:6s} contrast {contrast:5.0f} {label:8s} {counts}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--profile", action="store_true", help="iterations and time shares only")
    p.add_argument(
        "--dct", action="store_true", help="force the DCT fast solve (off by default) on walls"
    )
    p.add_argument(
        "--iterations",
        action="store_true",
        help="also the CG iteration counts of the Gaussian conditioning by variance and walls",
    )
    args = p.parse_args()
    if args.dct:
        from constraint_layers.local import fastsolve

        fastsolve.DCT_MIN_NODES = 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        args.size, args.width, args.batch, args.repeats = 64, 16, 4, 5
        args.periodic_sizes, args.wall_sizes, args.gaussian_sizes = (32, 64), (17, 33), (32, 64)
    else:
        args.size, args.width, args.batch, args.repeats = 128, 32, 8, 20
        args.periodic_sizes, args.wall_sizes = (64, 256), (33, 129)
        args.gaussian_sizes = (64, 128, 256)
    if args.profile:
        args.repeats = 3
        profile(args, device)
        return
    fno_steps(args, device)
    scaling(args, device)
    gaussian(args, device)


if __name__ == "__main__":
    main()
