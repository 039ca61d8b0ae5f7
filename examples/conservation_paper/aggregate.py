"""Summarise several training seeds of ``run.py``: mean and standard error OVER SEEDS.

Each seed's run reports, per case and model, the mean of a metric over the test functions; this
script averages those per-seed means and gives their standard error over seeds
(``std / sqrt(n_seeds)``, the spread due to training), the MSE gains of ProbConserv over each
black box per seed, the bounds comparison (ProbConserv with and without ``cl.Bounds``, the
published NNLS-after-update), the calibration of the bounded posterior (LL and the coverage of the
90% band on the held-out truth) and the shock positions.

Run (repository root), after ``run.py --quick --seed S --out out/seeds/seedS`` for a few ``S``::

    .venv/bin/python examples/conservation_paper/aggregate.py out/seeds/seed*/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

MSE_SCALE = {"diffusion": 4, "porous_medium": 4, "stefan": 3}
BLACK_BOXES = ("ANP", "GP", "Ensemble")


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error over seeds (nan for one seed)."""
    m = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return m, se


def fmt(values: list[float], scale: int = 0, digits: int = 3) -> str:
    m, se = mean_se([v * 10**scale for v in values])
    return f"{m:.{digits}g} ({se:.2g})"


def per_seed(runs: list[dict], label: str, model: str, key: str) -> list[float] | None:
    out = []
    for r in runs:
        t = r["cases"].get(label, {}).get("table", {}).get(model)
        if t is None or key not in t:
            return None
        out.append(t[key][0] if isinstance(t[key], list) else t[key])
    return out


def main_table(runs: list[dict], labels: list[str]) -> list[str]:
    lines = [
        "| case | model | MSE | LL | CE x 1e-3 |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        p = runs[0]["cases"][label]["problem"]
        ms = MSE_SCALE[p]
        for bb in BLACK_BOXES:
            for model in (bb, f"HardC-{bb}", f"ProbConserv-{bb}"):
                mse = per_seed(runs, label, model, "MSE")
                if mse is None:
                    continue
                ll = per_seed(runs, label, model, "LL")
                ce = per_seed(runs, label, model, "CE")
                lines.append(
                    f"| {label} | {model} | {fmt(mse, ms)} x 1e-{ms} | {fmt(ll)} | {fmt(ce, 3)} |"
                )
    return lines


def gains_table(runs: list[dict], labels: list[str]) -> list[str]:
    lines = [
        "| case | black box | MSE(X) / MSE(ProbConserv-X), per seed | mean (se) |",
        "|---|---|---|---|",
    ]
    for label in labels:
        for bb in BLACK_BOXES:
            a = per_seed(runs, label, bb, "MSE")
            b = per_seed(runs, label, f"ProbConserv-{bb}", "MSE")
            if a is None or b is None:
                continue
            g = [x / y for x, y in zip(a, b)]
            cells = ", ".join(f"{v:.2f}" for v in g)
            lines.append(f"| {label} | {bb} | {cells} | {fmt(g)} |")
    return lines


def bounds_table(runs: list[dict], labels: list[str]) -> list[str]:
    lines = [
        "| case | model | MSE | LL | 90% coverage | min(u) (mean of per-function minima) |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        p = runs[0]["cases"][label]["problem"]
        ms = MSE_SCALE[p]
        for bb in BLACK_BOXES:
            for model in (f"ProbConserv-{bb}", f"ProbConserv+Bounds-{bb}", f"NNLS-{bb}"):
                mse = per_seed(runs, label, model, "MSE")
                if mse is None or per_seed(runs, label, f"NNLS-{bb}", "MSE") is None:
                    continue
                ll = per_seed(runs, label, model, "LL")
                cov = per_seed(runs, label, model, "COV90")
                mn = per_seed(runs, label, model, "MIN")
                lines.append(
                    f"| {label} | {model} | {fmt(mse, ms)} x 1e-{ms} | {fmt(ll)} | {fmt(cov)} "
                    f"| {fmt(mn)} |"
                )
    return lines


def calibration_table(runs: list[dict], labels: list[str]) -> list[str]:
    variants = [
        ("ProbConserv-{}", "unbounded posterior"),
        ("ProbConserv+Bounds-{}", "bounded mean, conditioned on the active set (var 0 there)"),
        ("BoundedMean-{}", "bounded mean, unbounded variance"),
        ("NNLS-{}", "clipped mean, unbounded variance (published)"),
    ]
    lines = [
        "| case | black box | variant | LL | 90% coverage |",
        "|---|---|---|---|---|",
    ]
    for label in labels:
        for bb in ("ANP", "Ensemble"):
            for pattern, what in variants:
                model = pattern.format(bb)
                ll = per_seed(runs, label, model, "LL")
                cov = per_seed(runs, label, model, "COV90")
                if ll is None or cov is None:
                    continue
                lines.append(f"| {label} | {bb} | {what} | {fmt(ll)} | {fmt(cov)} |")
    return lines


def shock_table(runs: list[dict]) -> list[str]:
    names = ["ANP", "ProbConserv-ANP", "ProbConserv+Bounds-ANP", "Ensemble",
             "ProbConserv-Ensemble", "ProbConserv+Bounds-Ensemble"]  # fmt: skip
    lines = [
        "| case | true front | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for label, sh in runs[0].get("shock", {}).items():
        cells = []
        for n in names:
            vals = [r["shock"][label][n]["mean"] for r in runs if n in r["shock"].get(label, {})]
            cells.append(fmt(vals) if len(vals) == len(runs) else "-")
        lines.append(f"| {label} | {sh['true_front']:.4f} | " + " | ".join(cells) + " |")
    return lines


def report(runs: list[dict]) -> str:
    labels = [k for k in runs[0]["cases"] if all(k in r["cases"] for r in runs)]
    seeds = [r.get("seed", 0) for r in runs]
    out = [
        f"Training seeds {seeds}: mean (standard error over seeds) of each seed's mean over the "
        "test functions.",
        "",
        "#### CE, MSE and LL",
        "",
        *main_table(runs, labels),
        "",
        "#### MSE gain of ProbConserv over each black box",
        "",
        *gains_table(runs, labels),
        "",
        "#### Bounds: ProbConserv with and without cl.Bounds, and the published NNLS-after-update",
        "",
        *bounds_table(runs, labels),
        "",
        "#### Calibration of the bounded posterior on the held-out truth",
        "",
        *calibration_table(runs, labels),
        "",
        "#### Shock position at t* (first test function; mean over seeds of the posterior mean)",
        "",
        *shock_table(runs),
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of each seed")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    runs = [json.loads(p.read_text()) for p in args.results]
    text = report(runs)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
