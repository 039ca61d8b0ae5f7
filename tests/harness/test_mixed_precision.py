"""Mixed precision: CPU autocast (bfloat16), as neuraloperator's ``Trainer(mixed_precision=True)``
runs it (issue 19, item 2).

Under autocast a stock ``SpectralConv`` receives bfloat16 from the layers before it, runs its FFTs
in float32 and returns float32. The refined layer does the same: its refinement runs with
autocast off in float32, so its output equals the float32 refinement of the same input; the
model's output then differs from the float32 model's only by autocast's rounding elsewhere.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import constraint_layers as cl
from constraint_layers._tolerance import tolerance

pytest.importorskip("neuralop")

from _models import fno
from neuralop import Trainer
from neuralop.losses import LpLoss

BF16 = torch.bfloat16
D, N, P = cl.Dirichlet, cl.Neumann, cl.Periodic

CASES = [
    ("1D Dirichlet", (6,), (3, 1, 32), [D(0.5)]),
    ("1D Neumann", (6,), (3, 1, 32), [N(1.0)]),
    ("1D Periodic", (6,), (3, 1, 32), [P()]),
    ("2D Dirichlet + Neumann", (4, 4), (2, 1, 16, 12), [D(0.0, dim=0), N(0.5, dim=1)]),
]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name, modes, shape, bcs", CASES, ids=[c[0] for c in CASES])
def test_refine_under_autocast_matches_float32(name, modes, shape, bcs):
    torch.manual_seed(0)
    x = torch.randn(shape)
    model = fno(modes, hidden=4, n_layers=2)
    # debug=True: every row's residual checked after each call, at the output dtype's tolerance
    wrapped = cl.wrap(model, *bcs, mode="refine", debug=True)
    want = wrapped(x).detach()
    with torch.autocast("cpu", dtype=BF16):
        got = wrapped(x)
        bare_low = model(x)
    # as close to the float32 refinement as autocast brings the bare model to the float32 one
    bare = model(x).detach()
    tol = tolerance(BF16).reference
    assert _relative(got, want) <= tol
    assert _relative(got, want) <= 4 * _relative(bare_low, bare) + 1e-3
    # the rows hold in the output dtype (bfloat16 from the model's last layer under autocast):
    # the debug check passed; Dirichlet values to the bit
    assert got.dtype == BF16
    for bc in bcs:
        if isinstance(bc, D):  # (corners of 2D grids: the later Neumann condition holds there)
            face = got.movedim(2 + bc.axis(len(shape) - 2, "test"), -1)
            inner = face[..., 1:-1, :] if face.ndim > 3 else face
            assert bool((inner[..., 0] == bc.value).all() and (inner[..., -1] == bc.value).all())
    # and it trains: gradients reach every parameter and are finite
    with torch.autocast("cpu", dtype=BF16):
        loss = wrapped(x).float().square().mean()
    loss.backward()
    grads = [p.grad for p in wrapped.parameters() if p.requires_grad]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


def test_refined_layer_returns_float32_like_the_stock_layer():
    """Inside the model, a refined layer given bfloat16 returns float32, as the stock one does."""
    torch.manual_seed(0)
    model = fno((6,), hidden=4, n_layers=1)
    seen = {}
    conv = model.fno_blocks.convs[0]

    def record(module, args, out):
        seen["dtype"] = out.dtype

    conv.register_forward_hook(record)
    with torch.autocast("cpu", dtype=BF16):
        model(torch.randn(2, 1, 16))
    stock = seen.pop("dtype")
    wrapped = cl.wrap(model, D(0.0), mode="refine")
    with torch.autocast("cpu", dtype=BF16):
        wrapped(torch.randn(2, 1, 16))
    assert seen["dtype"] == stock == torch.float32


@pytest.mark.parametrize("mode", ["output", "refine"])
def test_neuralop_trainer_mixed_precision(mode, tmp_path):
    """neuraloperator's Trainer with mixed_precision=True trains, evaluates and checkpoints a
    wrapper; the walls hold on its predictions."""
    torch.manual_seed(0)
    n = 16
    s = torch.linspace(0, 1, n)
    x = torch.rand(16, 1, n, n)
    y = (x.mean(dim=(2, 3), keepdim=True) * torch.sin(torch.pi * s)[:, None]) * torch.sin(
        torch.pi * s
    )
    loader = torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=8)
    walls = [D(0.0, dim=0), D(0.0, dim=1)]
    model = cl.wrap(fno((4, 4), hidden=8), *walls, mode=mode)
    trainer = Trainer(model=model, n_epochs=2, mixed_precision=True, verbose=False)
    assert trainer.autocast_device_type == "cpu"
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # neuraloperator's own warnings (the `y` keyword, ...)
        errors = trainer.train(loader, {"test": loader}, opt, sched, training_loss=LpLoss(d=2),
                               eval_losses={"l2": LpLoss(d=2)}, save_every=1,
                               save_dir=tmp_path)  # fmt: skip
    assert "test_l2" in errors, errors
    assert all(math.isfinite(float(v)) for v in errors.values() if v is not None), errors
    assert (tmp_path / "model_state_dict.pt").exists()
    with torch.autocast("cpu", dtype=BF16), torch.no_grad():
        pred = model(x[:4])
    assert pred.dtype == BF16
    for face in (pred[..., 0, :], pred[..., -1, :], pred[..., :, 0], pred[..., :, -1]):
        assert bool((face == 0).all())
    state = torch.load(tmp_path / "model_state_dict.pt", weights_only=True)
    from constraint_layers.adapters.neuralop import REFINE_KEY

    state.pop(REFINE_KEY, None)  # a refine checkpoint's marker (plain loading refuses it)
    assert set(state) == set(cl.unwrap(model).state_dict()) - {"_metadata"}


class CircularNet(torch.nn.Module):
    """Shift-invariant layers without a spectral description: refined by probing."""

    def __init__(self) -> None:
        super().__init__()
        self.lift = torch.nn.Conv1d(1, 3, 1)
        self.mix = torch.nn.ModuleList(
            torch.nn.Conv1d(3, 3, 5, padding=2, padding_mode="circular") for _ in range(2)
        )
        self.proj = torch.nn.Conv1d(3, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        for layer in self.mix:
            x = torch.nn.functional.gelu(layer(x) + x)
        return self.proj(x)


class CircularAdapter(cl.adapters.Adapter):
    name = "test-harness-circular"
    supports_refinement = True

    def attach(self, wrapper):
        if wrapper.mode == "refine":
            for layer in wrapper.model.mix:
                wrapper.add_refinement(layer)


def test_probed_refinement_under_autocast():
    """A layer refined by probing (``add_refinement`` without a description) under autocast:
    the refinement in float32, the layer's own evaluation under autocast."""
    torch.manual_seed(0)
    bcs = [D(0.5, side="low"), N(1.0, side="high")]
    wrapped = cl.BoundaryCorrection(
        CircularNet(), bcs, mode="refine", adapter=CircularAdapter(), debug=True
    )
    x = torch.randn(2, 1, 24)
    want = wrapped(x).detach()
    with torch.autocast("cpu", dtype=BF16):
        got = wrapped(x)
    assert got.dtype == BF16
    assert _relative(got, want) <= tolerance(BF16).reference
    assert bool((got[..., 0] == 0.5).all())
    got.float().square().mean().backward()
