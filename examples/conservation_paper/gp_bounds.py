"""The GP rows of the bounds table alone: ProbConserv-GP, ProbConserv+Bounds-GP, BoundedMean-GP
and NNLS-GP on the bounded problems (PME, Stefan), mean (standard error) over the test functions.

The GP is fitted per test function on its context points, so these rows do not depend on the
training seed (``run.py --seed``); this script evaluates them once, with the same code as
``run.py`` (``evaluate._gp_models``)::

    OMP_NUM_THREADS=1 .venv/bin/python examples/conservation_paper/gp_bounds.py --quick
"""

from __future__ import annotations

import argparse
import time

import torch
from data import CONFIGS, test_cases
from evaluate import BOUNDS, _gp_models, case_metrics, summarise

MODELS = ("ProbConserv-GP", "ProbConserv+Bounds-GP", "BoundedMean-GP", "NNLS-GP")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--quick", action="store_true")
    size.add_argument("--full", action="store_true")
    size.add_argument("--tiny", action="store_true")
    p.add_argument("--problems", nargs="+", choices=sorted(BOUNDS), default=sorted(BOUNDS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = CONFIGS["quick" if args.quick else "full" if args.full else "tiny"]
    print(f"{cfg.name}: {cfg.n_test} test functions per case, threads {args.threads}")
    print("| case | model | MSE | LL | 90% coverage | min(u) | max abs CE | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for problem in args.problems:
        for case in test_cases(problem, cfg):
            t0 = time.perf_counter()
            preds = _gp_models(case, cfg)
            sec = time.perf_counter() - t0
            for name in MODELS:
                if name not in preds:
                    continue
                m, v = preds[name]
                met = case_metrics(m.to(torch.float64), v.to(torch.float64), case)
                s = {k: summarise(val) for k, val in met.items()}
                print(
                    f"| {case.label} | {name} | {s['MSE'][0]:.4g} ({s['MSE'][1]:.2g}) | "
                    f"{s['LL'][0]:.4g} ({s['LL'][1]:.2g}) | {s['COV90'][0]:.3g} | "
                    f"{s['MIN'][0]:.3g} | {float(met['CE'].abs().max()):.1e} | {sec:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
