"""Time the generation of every reference data set of `constraint_layers.problems`.

    .venv/bin/python examples/problems_generation_times.py --threads 1 [--size paper]

Nothing is cached (cache=False); the numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import time

import torch

from constraint_layers.problems import Burgers, Cavity, Heat, Stokes

CASES = [
    ("heat frames", Heat, {}, "frames"),
    ("heat single", Heat, {}, "single"),
    ("stokes frames", Stokes, {}, "frames"),
    ("burgers periodic frames", Burgers, {}, "frames"),
    ("burgers periodic single", Burgers, {}, "single"),
    ("burgers dirichlet single", Burgers, {"bc": "dirichlet"}, "single"),
    ("cavity frames", Cavity, {}, "frames"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--size", choices=("small", "paper", "both"), default="both")
    args = parser.parse_args()
    sizes = ("small", "paper") if args.size == "both" else (args.size,)
    for size in sizes:
        for name, cls, kwargs, task in CASES:
            start = time.perf_counter()
            data = cls(**kwargs).generate(task=task, size=size, cache=False, threads=args.threads)
            seconds = time.perf_counter() - start
            print(
                f"{size:5s} {name:25s} n={len(data):5d} y={tuple(data.y.shape)!s:24s} "
                f"{seconds:7.2f} s (threads={args.threads or torch.get_num_threads()})",
                flush=True,
            )


if __name__ == "__main__":
    main()
