"""Viscous Burgers (nu = 0.1), periodic and Dirichlet, side by side.

- Periodic: ``u0 -> u(x, t_1..t_25)``, t in (0, 1], on [0, 1] with both end nodes on the grid
  (N = 128 in the paper), 12 modes width 32, condition ``Periodic()`` (both ends take their
  average).
- Dirichlet: ``u0 -> u(., 1)`` (single step, N = 500 in the paper), 16 modes width 64, the end
  values of the solution prescribed per sample. Every model gets them as input channels (broadcast
  along x); the constrained models read their Dirichlet values back from those channels.

    .venv/bin/python examples/boundary_paper/burgers.py --quick          # CPU, minutes
    .venv/bin/python examples/boundary_paper/burgers.py --full           # paper sizes (GPU)
    .venv/bin/python examples/boundary_paper/burgers.py --full --smoke   # checks that --full starts
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
    "periodic": {
        "quick": {
            "n_train": 64,
            "n_test": 32,
            "resolution": 64,
            "frames": 13,
            "epochs": 20,
            "batch": 16,
        },
        "medium": {
            "n_train": 128,
            "n_test": 32,
            "resolution": 64,
            "frames": 13,
            "epochs": 32,
            "batch": 16,
        },
        "full": {"n_train": 1000, "n_test": 200, "resolution": 128, "epochs": 500, "batch": 20},
        "smoke": {"resolution": 16, "frames": 6},
    },
    "dirichlet": {
        "quick": {"n_train": 100, "n_test": 50, "resolution": 128, "epochs": 25, "batch": 20},
        "medium": {"n_train": 200, "n_test": 50, "resolution": 128, "epochs": 40, "batch": 20},
        "full": {"n_train": 500, "n_test": 100, "resolution": 500, "epochs": 500, "batch": 20},
        "smoke": {"resolution": 33},
    },
}


def make_tasks(size: str, smoke: bool) -> list[tuple[Task, Budget]]:
    out = []
    # periodic, 25 frames
    problem = cl.problems.Burgers(bc="periodic")
    cfg = sized(SIZES["periodic"], size, smoke)
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
    train, test = data.split(cfg["n_train"])
    task = Task(
        name="burgers_periodic",
        title=f"Burgers, periodic, {len(test.coords['t'])} frames",
        train=train,
        test=test,
        bcs=[cl.Periodic(dim=0)],
        walls=["x=0 vs x=1"],
        modes=12,
        width=32,
        inputs="u0 (repeated along t), x, t",
    )
    out.append((task, Budget(epochs=cfg["epochs"], batch_size=cfg["batch"])))
    out.append(dirichlet_task(size, smoke))
    return out


def dirichlet_task(size: str, smoke: bool = False) -> tuple[Task, Budget]:
    """The Dirichlet task (single step): data, walls read from the input channels, budget."""
    cfg = sized(SIZES["dirichlet"], size, smoke)
    data = generate(
        cl.problems.Burgers(bc="dirichlet"),
        cfg["n_train"] + cfg["n_test"],
        task="single",
        resolution=cfg["resolution"],
        cache=size == "full" and not smoke,
    )
    data, bcs = dirichlet_from_inputs(data, [("x_low", 0, "low"), ("x_high", 0, "high")])
    train, test = data.split(cfg["n_train"])
    task = Task(
        name="burgers_dirichlet",
        title="Burgers, Dirichlet, single step t = 1",
        train=train,
        test=test,
        bcs=bcs,
        walls=["x=0", "x=1"],
        modes=16,
        width=64,
        inputs="u0, x, u(0, 1) and u(1, 1) broadcast along x",
    )
    return task, Budget(epochs=cfg["epochs"], batch_size=cfg["batch"])


def draw(task, results, preds, out_dir):
    return figures.frames_error(task, results, preds, out_dir)


def main(argv=None):
    return run_experiment("burgers", make_tasks, draw, argv, description=__doc__)


if __name__ == "__main__":
    main()
