"""Speed of the bounded projection against the equality-only conserve() (issue 13).

Diagonal metric (a variance per node), one conservation row per time frame, the lower bound 0
active on about 10% of the nodes. Each case times, in the same run:

* ``conserve``: the equality-only ProbConserv update ``cl.functional.condition_gaussian`` (formerly
  ``conserve``) with a diagonal variance (the frames as a batch of one-row problems: its fastest
  layout for per-frame rows);
* ``bounded``: ``project_bounded_rows`` with the bound;
* ``bounded, no bound``: ``project_bounded_rows`` without bounds (the same solver, equality only);
* ``layer``: the whole layer, ``cl.wrap(head, mass, cl.Bounds(lower=0.0))`` on a Gaussian head
  (the equality-only update, the bounded step, the variance conditioned on the active set)
  against ``cl.wrap(head, mass)``: the ratio a user pays for the bounds.

The five calls of a case run interleaved, in rounds; times are medians over the rounds and the
ratios medians of the per-round ratios. Target: ``bounded`` at most 3x ``conserve``. Run (not
collected by pytest), with the machine otherwise idle::

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_bounds.py            # full sizes
    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_bounds.py --quick    # small sizes
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import constraint_layers as cl
from constraint_layers._bounded import project_bounded_rows

conserve = cl.functional.condition_gaussian  # the conditioning kernel (formerly conserve)


def interleaved(repeats: int, calls: dict, budget: float = 60.0) -> dict[str, list[float]]:
    """Wall times per call of each entry of ``calls`` (name -> zero-argument function), taken in
    rounds (every function once per round, in the same order), after one warm-up round: a
    slow spell of the machine hits every function of a round alike, so per-round ratios are
    steadier than ratios of separate best times."""
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return times


def paired_ratio(num: list[float], den: list[float]) -> float:
    """The median over rounds of ``num / den`` (times of the same round)."""
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def trapezoid(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.full((n,), 1.0 / (n - 1), dtype=dtype)
    g[0] = g[-1] = 0.5 / (n - 1)
    return g


def problem(batch: int, rows: int, n: int, dtype: torch.dtype, seed: int = 0):
    """u >= 0 except about 10% of the nodes (slightly negative, as a mean undershoots next to a
    front); the totals are the masses of u itself, so the projection must clamp those nodes to 0
    and remove the mass that adds elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(batch, rows, n, generator=gen, dtype=dtype) + 0.05
    neg = torch.rand(batch, rows, n, generator=gen) < 0.1
    u = torch.where(neg, -0.05 * torch.rand(u.shape, generator=gen, dtype=dtype), u)
    var = 0.01 + 0.1 * torch.rand(batch, rows, n, generator=gen, dtype=dtype)
    c = trapezoid(n, dtype)
    d = (c.double() * u.double()).sum(-1)
    return u, var, c, d


class _Head(torch.nn.Module):
    """A Gaussian head: the input as the mean, a fixed variance."""

    def __init__(self, var: torch.Tensor) -> None:
        super().__init__()
        self.var = var

    def forward(self, x: torch.Tensor):
        return x, self.var


def run_case(name: str, batch: int, rows: int, n: int, dtype: torch.dtype, repeats: int) -> dict:
    u, var, c, d = problem(batch, rows, n, dtype)
    b = d.unsqueeze(-1).to(dtype)  # conserve: one row per frame, (*batch, M=1)
    head = _Head(var.reshape(batch, 1, rows, n))
    mass = cl.Conservation.integral(d.reshape(batch, 1, rows), dim=1)
    grid = u.reshape(batch, 1, rows, n)
    plain, bounded = cl.wrap(head, mass), cl.wrap(head, mass, cl.Bounds(lower=0.0))
    with torch.no_grad():
        t = interleaved(
            repeats,
            {
                "conserve": lambda: conserve(u, c.unsqueeze(0), b, variance=var),
                "bounded": lambda: project_bounded_rows(u, c, d, weight=var, lower=0.0),
                "nobound": lambda: project_bounded_rows(u, c, d, weight=var),
                "layer": lambda: plain(grid),
                "layer_bounds": lambda: bounded(grid),
            },
        )
    x = project_bounded_rows(u, c, d, weight=var, lower=0.0)
    active = float((x == 0).double().mean())
    res = float(((c.double() * x.double()).sum(-1) - d).abs().max())
    return {
        "case": name,
        "N": batch * rows * n,
        "dtype": str(dtype).replace("torch.", ""),
        "active": active,
        "conserve_s": statistics.median(t["conserve"]),
        "bounded_s": statistics.median(t["bounded"]),
        "nobound_s": statistics.median(t["nobound"]),
        "ratio": paired_ratio(t["bounded"], t["conserve"]),
        "layer_ratio": paired_ratio(t["layer_bounds"], t["layer"]),
        "residual": res,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--repeats", type=int, default=9, help="interleaved rounds per case")
    args = ap.parse_args()
    if args.quick:
        cases = [
            ("paper layout, 10 x 51 x 51", 10, 51, 51),
            ("one row, N = 1e5", 1, 1, 100_000),
            ("10 rows, N = 1e5", 1, 10, 10_000),
        ]
    else:
        cases = [
            ("paper: 100 x 201 x 201", 100, 201, 201),
            ("one row, N = 1e7", 1, 1, 10_000_000),
            ("10 rows, N = 1e7", 1, 10, 1_000_000),
        ]
    print(
        f"torch {torch.__version__}, {platform.machine()}, threads {torch.get_num_threads()}; "
        "times: medians over interleaved rounds; ratios: medians of per-round ratios"
    )
    head = (
        f"| {'case':28s} | {'dtype':7s} | {'N':>9s} | active | conserve (s) | bounded (s) | "
        "no bound (s) | bounded / conserve | layer with / without bounds | max row residual |"
    )
    print(head)
    print("|" + "|".join("-" * (len(p)) for p in head.split("|")[1:-1]) + "|")
    for name, batch, rows, n in cases:
        for dtype in (torch.float32, torch.float64):
            r = run_case(name, batch, rows, n, dtype, args.repeats)
            print(
                f"| {r['case']:28s} | {r['dtype']:7s} | {r['N']:9.2e} | {r['active']:6.1%} | "
                f"{r['conserve_s']:12.4f} | {r['bounded_s']:11.4f} | {r['nobound_s']:12.4f} | "
                f"{r['ratio']:18.2f} | {r['layer_ratio']:27.2f} | {r['residual']:16.1e} |"
            )


if __name__ == "__main__":
    main()
