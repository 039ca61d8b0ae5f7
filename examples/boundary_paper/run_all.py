"""Run every boundary-paper experiment and write one combined markdown table.

    .venv/bin/python examples/boundary_paper/run_all.py                # every --quick run
    .venv/bin/python examples/boundary_paper/run_all.py --table-only   # rebuild the table only

Each experiment runs in its own process (``heat.py``, ``stokes.py``, ``burgers.py``,
``cavity.py``); extra options (``--threads``, ``--full``, ``--smoke``, ``--seeds``) are passed on.
The combined table goes to ``<out>/boundary_paper.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import describe_sizes, markdown_table  # noqa: E402

#: the four experiment families, then the study of the refinement's gradients
EXPERIMENTS = ("heat", "stokes", "burgers", "cavity", "refine_gradients")


def combined_markdown(out: Path, experiments=EXPERIMENTS, timings: dict | None = None) -> str:
    """The markdown report of every ``<out>/<experiment>/results.json`` found."""
    parts = ["# Boundary paper (BOON) reproduced side by side", ""]
    env = None
    for name in experiments:
        path = out / name / "results.json"
        if not path.exists():
            parts += [f"## {name}", "", f"(no results: {path} is missing)", ""]
            continue
        payload = json.loads(path.read_text())
        env = env or payload["environment"]
        wall = payload["wall_seconds"]
        if timings and name in timings:
            wall = timings[name]  # the whole process, imports included
        command = payload["command"].replace(str(Path.cwd()) + "/", "")
        parts += [
            f"## {name}",
            "",
            f"`{command}` ({payload['size']}; {wall:.0f} s wall, "
            f"threads={payload['environment']['threads']}, {payload['environment']['device']})",
            "",
        ]
        for results in payload["tasks"].values():
            parts += [f"**{describe_sizes(results)}**", "", markdown_table(results), ""]
        if "extra" in payload:
            parts += [
                "Directional derivative of sum(c * output) along a random spectral-weight "
                "direction (float64; finite differences with eps = 1e-3):",
                "",
                "| grid | " + " | ".join(next(iter(payload["extra"].values()))) + " |",
                "|---|" + "---:|" * len(next(iter(payload["extra"].values()))),
            ]
            for grid, vals in payload["extra"].items():
                parts.append(f"| {grid} | " + " | ".join(f"{v:.4g}" for v in vals.values()) + " |")
            parts.append("")
    if env:
        parts += [
            "Relative L2: mean over seeds (standard error). Boundary error: largest absolute "
            "residual of each wall's condition on the test set (Neumann: flux with the "
            "2nd-order one-sided stencil), mean over seeds. s/epoch: median training time.",
            "",
            f"Environment: python {env['python']}, torch {env['torch']}, neuraloperator "
            f"{env['neuraloperator']}, {env['device']}.",
        ]
    return "\n".join(parts) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="out")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    args, passthrough = p.parse_known_args(argv)
    out = Path(args.out)
    timing_file = out / "run_all_timings.json"
    timings = json.loads(timing_file.read_text()) if timing_file.exists() else {}
    if not args.table_only:
        for name in args.experiments:
            cmd = [sys.executable, str(HERE / f"{name}.py"), "--out", str(out), *passthrough]
            if not any(a in passthrough for a in ("--quick", "--medium", "--full")):
                cmd.insert(2, "--quick")
            print("$", " ".join(cmd), flush=True)
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            timings[name] = time.perf_counter() - start
            print(f"{name}: {timings[name]:.1f} s wall (process)", flush=True)
            out.mkdir(parents=True, exist_ok=True)
            timing_file.write_text(json.dumps(timings, indent=1))
    report = combined_markdown(out, args.experiments, timings or None)
    out.mkdir(parents=True, exist_ok=True)
    (out / "boundary_paper.md").write_text(report)
    print(report)
    print(f"wrote {out / 'boundary_paper.md'}")


if __name__ == "__main__":
    main()
