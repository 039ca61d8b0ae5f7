"""Lid-driven cavity at Re = 100 (Dirichlet on 4 walls), side by side.

Vorticity ``w0 -> w(x, y, t_1..t_25)`` on the unit square, t_final = 2 (8 modes, width 20; grid
50 x 50 x 25 in the paper). The wall vorticity of every frame (from the simulation) is the
Dirichlet data: every model gets it as four input channels (each wall's values broadcast across
the square), and the constrained models read their values back from those channels. Two
constrained axes: the library's refinement solves the x and the y faces from the same residual
(T2, a block-Jacobi step) and writes the boundary rows of every face (T1), so the decoupling is
exact for every axis.

    .venv/bin/python examples/boundary_paper/cavity.py --quick          # CPU, minutes
    .venv/bin/python examples/boundary_paper/cavity.py --full           # paper sizes (GPU)
    .venv/bin/python examples/boundary_paper/cavity.py --full --smoke   # checks that --full starts
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures
import torch
from common import Budget, Task, dirichlet_from_inputs, generate, run_experiment, sized

import constraint_layers as cl

SIZES = {
    "quick": {
        "n_train": 24,
        "n_test": 12,
        "resolution": 12,
        "refine": 2,
        "frames": 8,
        "epochs": 6,
        "batch": 4,
    },
    "medium": {
        "n_train": 48,
        "n_test": 12,
        "resolution": 12,
        "refine": 2,
        "frames": 8,
        "epochs": 10,
        "batch": 4,
    },
    "full": {"n_train": 1000, "n_test": 200, "resolution": 50, "epochs": 500, "batch": 20},
    "smoke": {"resolution": 8, "refine": 1, "frames": 4},
}

WALLS = [
    ("x_low", 0, "low", "x=0"),
    ("x_high", 0, "high", "x=1"),
    ("y_low", 1, "low", "y=0"),
    ("y_high", 1, "high", "y=1 lid"),
]


def make_tasks(size: str, smoke: bool) -> list[tuple[Task, Budget]]:
    cfg = sized(SIZES, size, smoke)
    problem = cl.problems.Cavity(refine=cfg.get("refine", 1))
    times = None
    if "frames" in cfg:
        times = torch.linspace(0, problem.t_final, cfg["frames"] + 1, dtype=torch.float64)[1:]
    data = generate(
        problem,
        cfg["n_train"] + cfg["n_test"],
        task="frames",
        resolution=cfg["resolution"],
        times=times,
        cache=size == "full" and not smoke,
    )
    data, bcs = dirichlet_from_inputs(data, [w[:3] for w in WALLS])
    train, test = data.split(cfg["n_train"])
    task = Task(
        name="cavity",
        title=f"Lid-driven cavity, Re = 100, Dirichlet on 4 walls, {len(test.coords['t'])} frames",
        train=train,
        test=test,
        bcs=bcs,
        walls=[w[3] for w in WALLS],
        modes=8,
        width=20,
        inputs="w0 (repeated along t), x, y, t, the 4 walls' vorticity broadcast across",
        notes=f"simulated on a {cfg.get('refine', 1)}x finer grid" if cfg.get("refine") else "",
    )
    return [(task, Budget(epochs=cfg["epochs"], batch_size=cfg["batch"]))]


def draw(task, results, preds, out_dir):
    return figures.cavity(task, results, preds, out_dir)


def main(argv=None):
    return run_experiment("cavity", make_tasks, draw, argv, description=__doc__)


if __name__ == "__main__":
    main()
