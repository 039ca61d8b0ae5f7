"""Stokes' second problem (oscillating plate, Dirichlet at x = 0), side by side.

``u_t = nu u_xx`` on [0, 1], ``nu = 0.1``, plate ``u(0, t) = U cos(omega t)`` with omega drawn per
sample, the far end held at the half-line solution's value; ``u0 -> u(x, t_1..t_25)`` (12 modes,
width 32). The plate value depends on omega, which the initial condition does not reveal: every
model gets it as an input channel (the plate values per frame, broadcast along x), and the
constrained models read their Dirichlet value back from that channel.

    .venv/bin/python examples/boundary_paper/stokes.py --quick          # CPU, minutes
    .venv/bin/python examples/boundary_paper/stokes.py --full           # paper sizes (GPU)
    .venv/bin/python examples/boundary_paper/stokes.py --full --smoke   # checks that --full starts
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
        "n_train": 64,
        "n_test": 32,
        "resolution": 64,
        "frames": 13,
        "epochs": 22,
        "batch": 16,
    },
    "medium": {
        "n_train": 128,
        "n_test": 32,
        "resolution": 64,
        "frames": 13,
        "epochs": 35,
        "batch": 16,
    },
    "full": {"n_train": 1000, "n_test": 200, "resolution": 500, "epochs": 500, "batch": 20},
    "smoke": {"resolution": 16, "frames": 6},
}


def make_tasks(size: str, smoke: bool) -> list[tuple[Task, Budget]]:
    problem = cl.problems.Stokes()
    cfg = sized(SIZES, size, smoke)
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
    data, bcs = dirichlet_from_inputs(data, [("x_low", 0, "low")])
    train, test = data.split(cfg["n_train"])
    task = Task(
        name="stokes",
        title=f"Stokes' second problem, Dirichlet at x = 0, {len(test.coords['t'])} frames",
        train=train,
        test=test,
        bcs=bcs,
        walls=["x=0 plate"],
        modes=12,
        width=32,
        inputs="u0 (repeated along t), x, t, plate value g(t) broadcast along x",
    )
    return [(task, Budget(epochs=cfg["epochs"], batch_size=cfg["batch"]))]


def draw(task, results, preds, out_dir):
    return figures.stokes(task, results, preds, out_dir)


def main(argv=None):
    return run_experiment("stokes", make_tasks, draw, argv, description=__doc__)


if __name__ == "__main__":
    main()
