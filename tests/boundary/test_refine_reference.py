"""mode="refine": outputs and gradients equal stored reference values (float64).

The references were computed by the refinement code before its speed work (issue 12): any later
change to how the refinement is computed must give the same outputs and gradients to rounding.
Regenerate only for an intended change of the method (then say so in the commit):

    .venv/bin/python tests/boundary/test_refine_reference.py --write
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import constraint_layers as cl

pytest.importorskip("neuralop")

from _models import complex128_spectral, fno, tfno

F64 = torch.float64
DATA = Path(__file__).parent / "data" / "refine_reference.pt"

_D0 = cl.Dirichlet(0.5, dim=0)
_N1 = cl.Neumann(1.0, dim=1, order=3)

#: name -> (model factory, input shape, conditions, wrap options)
CASES = {
    "1d-neumann": (lambda: fno((8,), hidden=4, dtype=F64), (2, 1, 32),
                   [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")], {}),
    "1d-dirichlet-low-padded": (lambda: fno((6,), hidden=3, dtype=F64, domain_padding=0.25),
                                (2, 1, 24), [cl.Dirichlet(1.0, side="low")], {}),
    "2d-dirichlet-x-neumann-y": (lambda: fno((6, 6), hidden=4, dtype=F64), (2, 1, 16, 12),
                                 [_D0, _N1], {}),
    "2d-neumann-y-dirichlet-x-pinv": (lambda: fno((6, 4), hidden=3, dtype=F64), (2, 1, 12, 10),
                                      [_N1, _D0], {"rcond": 0.0}),
    "2d-tucker-padded-periodic-y": (
        lambda: tfno((6, 4), hidden=3, dtype=F64, domain_padding=0.2), (2, 1, 20, 10),
        [cl.Dirichlet(0.0, dim=0, side="low"), cl.Periodic(dim=1)], {}),
    "2d-dirichlet-last-axis-high": (lambda: fno((4, 6), hidden=3, dtype=F64), (1, 1, 8, 14),
                                    [cl.Dirichlet(0.0, dim=1, side="high")], {}),
    "2d-nyquist-all-modes": (lambda: fno((8, 8), hidden=2, dtype=F64), (2, 1, 8, 8),
                             [_D0, _N1], {}),
    "3d-xyz": (lambda: fno((4, 4, 4), hidden=3, dtype=F64, domain_padding=0.25), (1, 1, 8, 8, 6),
               [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1),
                cl.Dirichlet(0.0, dim=2, side="low")], {}),
}  # fmt: skip


def _tensors(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items() if torch.is_tensor(v)}


def _evaluate(name: str, state: dict | None = None) -> dict:
    """The case's model (seeded, or loaded from ``state``), its refined output with and without
    gradients, and the gradients of a fixed linear functional in the input and the weights."""
    make, shape, bcs, opts = CASES[name]
    torch.manual_seed(0)
    model = make()
    if state is not None:
        model.load_state_dict(state["model"], strict=False)
        x, w = state["x"], state["w"]
    else:
        x = torch.randn(shape, dtype=F64)
        w = None
    # the references were stored with rcond 1e-5 (the default then): pinned, so that a change
    # of the default is not mistaken for a change of the computation
    wrapped = cl.wrap(model, *bcs, mode="refine", **{"rcond": 1e-5, **opts})
    with complex128_spectral():
        xg = x.clone().requires_grad_()
        y = wrapped(xg)
        w = torch.randn_like(y) if w is None else w
        names = [k for k, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in model.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * w).sum(), [xg, *params])
        with torch.no_grad():
            y_nograd = wrapped(x)
            y_cached = wrapped(x)
    return {
        "model": _tensors(model.state_dict()),
        "x": x,
        "w": w,
        "y": y.detach(),
        "y_nograd": y_nograd,
        "y_cached": y_cached,
        "grads": dict(zip(["input", *names], [g.detach() for g in grads])),
    }


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-9) -> bool:
    scale = want.abs().max().clamp_min(1e-300)
    return got.shape == want.shape and bool((got - want).abs().max() <= tol * scale)


@pytest.mark.parametrize("name", list(CASES))
def test_refined_outputs_and_gradients_equal_the_reference(name):
    ref = torch.load(DATA, weights_only=True)[name]
    got = _evaluate(name, ref)
    for key in ("y", "y_nograd", "y_cached"):
        assert _close(got[key], ref["y"]), key
    assert set(got["grads"]) == set(ref["grads"])
    for key, g in ref["grads"].items():
        assert _close(got["grads"][key], g), key


if __name__ == "__main__" and "--write" in sys.argv:
    DATA.parent.mkdir(exist_ok=True)
    out = {name: _evaluate(name) for name in CASES}
    for case in out.values():  # equal to "y" by the test's own check
        del case["y_nograd"], case["y_cached"]
    torch.save(out, DATA)
    print(f"wrote {len(CASES)} cases to {DATA.name}")
