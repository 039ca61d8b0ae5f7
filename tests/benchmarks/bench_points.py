"""Cost of point constraints on a GINO: wrapped / plain forward+backward, interleaved in one run.

The wrapped model carries no penetration at the surface points (``cl.NormalComponent``), a
far-field ``cl.Dirichlet(points=)`` and a weighted integral: the O(points) path (closed form per
point plus the Schur complement of the integral rows). Each row alternates plain and wrapped
measurements (best of ``--repeats``) so both see the same machine state. Target: <= 1.05x.

Run (not collected by pytest)::

    .venv/bin/python tests/benchmarks/bench_points.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import constraint_layers as cl


def make(n_points: int, batch: int):
    from neuralop.models import GINO

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gino = GINO(
            in_channels=2, out_channels=2, fno_in_channels=2, gno_coord_dim=2,
            in_gno_radius=0.1, out_gno_radius=0.1, fno_n_modes=(8, 8), fno_hidden_channels=16,
            fno_n_layers=2, projection_channel_ratio=2, fno_lifting_channel_ratio=2,
            gno_use_open3d=False,
        )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(n_points, 2, generator=g)
    lat = torch.stack(torch.meshgrid(*[torch.linspace(0, 1, 16)] * 2, indexing="ij"), -1)
    call = dict(
        input_geom=pts.unsqueeze(0), latent_queries=lat.unsqueeze(0),
        output_queries=pts.unsqueeze(0), x=torch.randn(batch, n_points, 2, generator=g),
    )  # fmt: skip
    surface = torch.zeros(n_points, dtype=torch.bool)
    surface[: n_points // 8] = True
    outer = torch.zeros(n_points, dtype=torch.bool)
    outer[n_points // 8 : n_points // 4] = True
    normals = torch.randn(int(surface.sum()), 2, generator=g)
    w = torch.full((n_points,), 1.0 / n_points)
    wrapped = cl.wrap(
        gino,
        cl.NormalComponent(0.0, normals=normals, points=surface, channels=(0, 1)),
        cl.Dirichlet(1.0, points=outer, channels=0),
        cl.Conservation.integral(0.0, weights=w),
    )
    return gino, wrapped, call


def projection_only(n_points: int, batch: int, repeats: int) -> float:
    """Best fwd+bwd time (s) of the wrapper around an identity: the point projection alone."""
    g = torch.Generator().manual_seed(0)
    surface = torch.zeros(n_points, dtype=torch.bool)
    surface[: n_points // 8] = True
    outer = torch.zeros(n_points, dtype=torch.bool)
    outer[n_points // 8 : n_points // 4] = True
    normals = torch.randn(int(surface.sum()), 2, generator=g)
    model = cl.wrap(
        torch.nn.Identity(),
        cl.NormalComponent(0.0, normals=normals, points=surface, channels=(0, 1)),
        cl.Dirichlet(1.0, points=outer, channels=0),
        cl.Conservation.integral(0.0, weights=torch.full((n_points,), 1.0 / n_points)),
    )
    u = torch.randn(batch, n_points, 2, generator=g, requires_grad=True)
    return best(lambda: model(u).square().mean().backward(), repeats)


def step(model, call):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = model(**call)
    y.square().mean().backward()


def best(fn, repeats: int) -> float:
    fn()
    out = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--cases", nargs="+", default=["512x4", "2048x4"], help="points x batch, e.g. 4096x8"
    )
    ap.add_argument(
        "--projection-only", action="store_true", help="time the point projection alone"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s)")  # fmt: skip
    if args.projection_only:
        print("| points | batch | projection fwd+bwd (ms) |")
        print("|---|---|---|")
        for case in args.cases:
            n_points, batch = (int(v) for v in case.split("x"))
            t = projection_only(n_points, batch, args.repeats)
            print(f"| {n_points} | {batch} | {1e3 * t:.2f} |", flush=True)
        return
    print("| points | batch | plain fwd+bwd (ms) | wrapped (ms) | ratio |")
    print("|---|---|---|---|---|")
    for case in args.cases:
        n_points, batch = (int(v) for v in case.split("x"))
        gino, wrapped, call = make(n_points, batch)
        tp, tw = float("inf"), float("inf")
        for _ in range(3):  # interleaved rounds
            tp = min(tp, best(lambda m=gino, c=call: step(m, c), args.repeats))
            tw = min(tw, best(lambda m=wrapped, c=call: step(m, c), args.repeats))
        print(
            f"| {n_points} | {batch} | {1e3 * tp:.1f} | {1e3 * tw:.1f} | {tw / tp:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
