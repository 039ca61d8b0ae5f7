"""Heat equation with Neumann walls (BOON's "insulator at boundary"), side by side.

``u_t = k u_xx`` on [0, 1], insulated wall ``du/dx = 0`` at x = 0, heater ``du/dx = U sin(pi t)``
at x = 1 (U = 5, k = 0.01), ``u0 = cos(omega pi x)`` with omega ~ U[2.01, 3.99]. Two tasks:
single step ``u0 -> u(., 0.5)`` (16 modes, width 64) and 25 frames ``u0 -> u(x, t_1..t_25)`` with
t in (0, 0.5] (12 modes, width 32). Conditions: ``Neumann(0, dim=0, side="low")`` and
``Neumann(U sin(pi t), dim=0, side="high")`` (outward normals), second-order one-sided stencils.

    .venv/bin/python examples/boundary_paper/heat.py --quick          # CPU, minutes
    .venv/bin/python examples/boundary_paper/heat.py --full           # paper sizes (GPU)
    .venv/bin/python examples/boundary_paper/heat.py --full --smoke   # checks that --full starts
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures
import torch
from common import Budget, Task, generate, run_experiment, sized

import constraint_layers as cl

SIZES = {
    "single": {
        "quick": {"n_train": 100, "n_test": 50, "resolution": 128, "epochs": 25, "batch": 20},
        "medium": {"n_train": 200, "n_test": 50, "resolution": 128, "epochs": 40, "batch": 20},
        "full": {"n_train": 500, "n_test": 100, "resolution": 500, "epochs": 500, "batch": 20},
        "smoke": {"resolution": 33},
    },
    "frames": {
        "quick": {
            "n_train": 64,
            "n_test": 32,
            "resolution": 64,
            "frames": 13,
            "epochs": 15,
            "batch": 16,
        },
        "medium": {
            "n_train": 128,
            "n_test": 32,
            "resolution": 64,
            "frames": 13,
            "epochs": 24,
            "batch": 16,
        },
        "full": {"n_train": 1000, "n_test": 200, "resolution": 1024, "epochs": 500, "batch": 20},
        "smoke": {"resolution": 32, "frames": 6},
    },
}


def _constant_face(data, key: str) -> torch.Tensor:
    """The face values of ``key``, the same for every sample: one per frame (or a scalar)."""
    face = data.boundary[key]
    if not torch.equal(face, face[:1].expand_as(face)):
        raise ValueError(f"heat: expected the same {key} values for every sample")
    return face[0, 0]


def make_tasks(size: str, smoke: bool) -> list[tuple[Task, Budget]]:
    problem = cl.problems.Heat()
    out = []
    for kind, modes, width in (("single", 16, 64), ("frames", 12, 32)):
        cfg = sized(SIZES[kind], size, smoke)
        times = None
        if "frames" in cfg:
            times = torch.linspace(0, problem.t_final, cfg["frames"] + 1, dtype=torch.float64)[1:]
        data = generate(
            problem,
            cfg["n_train"] + cfg["n_test"],
            task=kind,
            resolution=cfg["resolution"],
            times=times,
            cache=size == "full" and not smoke,
        )
        train, test = data.split(cfg["n_train"])
        bcs = [
            cl.Neumann(_constant_face(data, "x_low"), dim=0, side="low"),
            cl.Neumann(_constant_face(data, "x_high"), dim=0, side="high"),
        ]
        inputs = "u0, x" if kind == "single" else "u0 (repeated along t), x, t"
        task = Task(
            name=f"heat_{kind}",
            title="Heat, Neumann, "
            + ("single step t = 0.5" if kind == "single" else f"{len(test.coords['t'])} frames"),
            train=train,
            test=test,
            bcs=bcs,
            walls=["x=0 insulated (flux)", "x=1 heater (flux)"],
            modes=modes,
            width=width,
            inputs=inputs,
            notes="boundary error = max |du/dn - g| with the 2nd-order one-sided stencil",
        )
        out.append((task, Budget(epochs=cfg["epochs"], batch_size=cfg["batch"])))
    return out


def draw(task, results, preds, out_dir):
    return figures.heat(task, results, preds, out_dir)


def main(argv=None):
    return run_experiment("heat", make_tasks, draw, argv, description=__doc__)


if __name__ == "__main__":
    main()
