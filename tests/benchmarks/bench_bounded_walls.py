"""Speed of walls + a total + an active lower bound on a 2D grid, against the same total and
bound without walls (issue 18). Deterministic output (``nn.Identity``), Neumann walls on both
axes, the total over the box, ``Bounds(lower=0)`` active on about half of the nodes. Prints the
best of 5 calls per case; the machine may be shared (indicative). Run (not collected by pytest)::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_bounded_walls.py
"""

from __future__ import annotations

import time

import torch
from torch import nn

import constraint_layers as cl

F64 = torch.float64


def best(fn, repeats: int = 5) -> float:
    fn()  # the plan's caches
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    print("grid     batch  walls [ms]  no walls [ms]  ratio")
    for n in (16, 32, 64):
        for batch in (1, 4):
            x = torch.randn(batch, 1, n, n, dtype=F64, generator=torch.Generator().manual_seed(0))
            total = cl.Conservation.integral(0.4, dim=(0, 1))
            walls = [cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1)]
            with_walls = cl.wrap(nn.Identity(), *walls, total, cl.Bounds(lower=0.0))
            without = cl.wrap(nn.Identity(), total, cl.Bounds(lower=0.0))
            a = best(lambda m=with_walls, x=x: m(x))
            b = best(lambda m=without, x=x: m(x))
            print(f"{n:3d}^2    {batch:5d}  {a * 1e3:10.1f}  {b * 1e3:13.1f}  {a / b:5.0f}x")


if __name__ == "__main__":
    main()
