"""How the gradients of ``mode="refine"`` affect training.

The library first treated the refinement's impulse probe (``K_BB^+`` and the impulse response) as
constants in backpropagation; this study showed that the dependence it dropped dominates the
gradient, and the library now keeps the probe in the autograd graph while training (exact
gradients; ``refresh > 1`` freezes it again, for speed). This script

1. measures the directional derivative of a refined FNO's output with respect to one spectral
   weight three ways: autograd (the library), and central finite differences with the probe
   recomputed (the true derivative) or frozen (``refresh`` large);
2. trains, on the two 1D single-step tasks (heat, Neumann; Burgers, Dirichlet), the plain FNO, the
   output step, the library's refinement and the same refinement with its probe frozen at every
   call (``refine_frozen`` in ``common.py``).

    .venv/bin/python examples/boundary_paper/refine_gradients.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import burgers
import figures
import heat
import torch
from common import run_experiment

import constraint_layers as cl

MODELS = ("fno", "output", "refine", "refine_frozen")


def make_tasks(size: str, smoke: bool):
    return [heat.make_tasks(size, smoke)[0], burgers.make_tasks(size, smoke)[1]]


def directional_derivatives(eps: float = 1e-3) -> dict:
    """d/ds of sum(c * model(x)) along a random direction of one spectral weight (float64)."""
    from neuralop.models import FNO

    out = {}
    for name, shape, modes, bcs in (
        ("1d", (2, 2, 24), (8,), [cl.Dirichlet(0.0)]),
        ("xt", (2, 2, 24, 6), (8, 6), [cl.Dirichlet(0.0, dim=0)]),
    ):
        torch.manual_seed(0)
        fno = FNO(n_modes=modes, in_channels=2, out_channels=1, hidden_channels=4)
        for t in list(fno.parameters()) + list(fno.buffers()):
            t.data = t.data.to(torch.complex128 if t.is_complex() else torch.float64)
        x = torch.randn(shape, dtype=torch.float64)
        c = torch.randn(shape[0], 1, *shape[2:], dtype=torch.float64)
        p = dict(fno.named_parameters())["fno_blocks.convs.1.weight.tensor"]
        d = torch.randn_like(p)
        res = {}
        for variant in ("plain", "refine autograd", "refine recomputed", "refine frozen"):
            if variant == "plain":
                model = fno
            else:
                refresh = 10**9 if variant == "refine frozen" else 1
                model = cl.wrap(fno, *bcs, mode="refine", refresh=refresh)
            if variant in ("plain", "refine autograd"):
                (g,) = torch.autograd.grad((model(x) * c).sum(), p)
                res[variant] = float((g.conj() * d).real.sum())
            else:
                with torch.no_grad():
                    model(x)  # the frozen variant keeps this probe of the unperturbed weights
                    p.add_(eps * d)
                    hi = float((model(x) * c).sum())
                    p.sub_(2 * eps * d)
                    lo = float((model(x) * c).sum())
                    p.add_(eps * d)
                res[variant] = (hi - lo) / (2 * eps)
            if variant != "plain":
                cl.unwrap(model)
        out[name] = res
        print(
            f"directional derivative, {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items())
        )
    return out


def draw(task, results, preds, out_dir):
    return figures.frames_error(task, results, preds, out_dir)


def main(argv=None):
    return run_experiment(
        "refine_gradients",
        make_tasks,
        draw,
        argv,
        description=__doc__,
        models=MODELS,
        extra=directional_derivatives,
    )


if __name__ == "__main__":
    main()
