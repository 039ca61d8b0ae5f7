"""Validation under ``torch.inference_mode()``, then training (issue 19, item 1).

PyTorch Lightning validates under ``torch.inference_mode()`` by default and then trains. The
library keeps structure that depends only on the constraints and the grid in process-wide caches
(boundary plans, DFT constants, sparse rows); a tensor made under inference mode and cached there
would make the next backward fail ("Inference tensors cannot be saved for backward"), in the
same wrapper or in another one with the same condition and shape. Every case below starts from
empty caches, calls the wrapper under inference mode (and under ``no_grad``), then trains one
step, and checks the values and gradients against a run that never saw inference mode.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers._engine import faces as enforce  # the face-local step (its plan cache)
from constraint_layers.boundary import refine, spectral
from constraint_layers.conservation import linalg

pytest.importorskip("neuralop")

from _models import fno

F32, F64 = torch.float32, torch.float64


def clear_caches() -> None:
    """Empty every process-wide cache of structure, so the first call below fills it."""
    enforce._CACHE.clear()
    linalg._cache.clear()
    refine._index.cache_clear()
    for name in dir(spectral):
        f = getattr(spectral, name)
        if isinstance(f, functools._lru_cache_wrapper):
            f.cache_clear()


class Head(nn.Module):
    """A probabilistic head: ``(mean, variance)`` on a 2D grid."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        out = self.conv(x)
        return out[:, :1], nn.functional.softplus(out[:, 1:]) + 0.1


class Net2d(nn.Module):
    """A deterministic 2D model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def fno1d() -> nn.Module:
    return fno((6,), hidden=4, n_layers=2)


def fno2d() -> nn.Module:
    return fno((4, 4), hidden=4, n_layers=2)


D, N, P = cl.Dirichlet, cl.Neumann, cl.Periodic
TOTAL = cl.Conservation.integral

#: (name, model factory, input shape, constraints, options): every mode and family.
CASES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], list, dict]] = [
    ("output Dirichlet", fno1d, (3, 1, 32), [D(0.5)], {}),
    ("output Neumann", fno1d, (3, 1, 32), [N(1.0)], {}),
    ("output Periodic", fno1d, (3, 1, 32), [P()], {}),
    ("output lift", fno1d, (3, 1, 32), [D(0.0)], {"lift": 4}),
    ("output 2D walls", fno2d, (2, 1, 16, 16), [D(0.0, dim=0), N(0.0, dim=1)], {}),
    ("refine Dirichlet", fno1d, (3, 1, 32), [D(0.0)], {"mode": "refine"}),
    (
        "refine Neumann 2D",
        fno2d,
        (2, 1, 16, 16),
        [N(0.0, dim=0), D(0.0, dim=1)],
        {"mode": "refine"},
    ),
    ("refine Periodic", fno1d, (3, 1, 32), [P()], {"mode": "refine"}),
    ("refine refresh=2", fno1d, (3, 1, 32), [D(0.0)], {"mode": "refine", "refresh": 2}),
    ("refine detached", fno1d, (3, 1, 32), [D(0.0)], {"mode": "refine", "kernel_grad": "detached"}),
    ("joint walls + total", fno1d, (3, 1, 32), [D(0.0), TOTAL(1.0)], {}),
    ("joint Neumann + total", fno1d, (3, 1, 32), [N(0.0), TOTAL(1.0)], {}),
    ("joint refine + total", fno1d, (3, 1, 32), [D(0.0), TOTAL(1.0)], {"mode": "refine"}),
    ("joint Gaussian", Head, (2, 1, 16, 16), [D(0.0, dim=0), TOTAL(1.0, dim=0)], {}),
    ("conservation Gaussian", Head, (2, 1, 64, 64), [TOTAL(1.0, dim=0)], {}),
    ("conservation deterministic", Net2d, (2, 1, 64, 64), [TOTAL(1.0, dim=0)], {}),
    ("bounds", fno1d, (3, 1, 32), [cl.Bounds(lower=-0.05)], {}),
    (
        "bounds + walls + total",
        Net2d,
        (2, 1, 8, 8),
        [D(0.0, dim=0), TOTAL(0.1, dim=0), cl.Bounds(lower=-1.0)],
        {},
    ),
]


def _mean(out):
    return out[0] if isinstance(out, tuple) else out


def _loss(out) -> torch.Tensor:
    if isinstance(out, tuple):
        return out[0].square().mean() + out[1].mean()
    return out.square().mean()


def _train_step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    _loss(model(x)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _case(name):
    return next(c for c in CASES if c[0] == name)


@pytest.mark.parametrize("name", [c[0] for c in CASES])
@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
def test_inference_then_training(name, context):
    _, make, shape, constraints, options = _case(name)
    torch.manual_seed(0)
    x = torch.randn(shape)
    torch.manual_seed(1)
    model = make()

    # the reference: a process that never saw inference mode
    clear_caches()
    reference = cl.wrap(model, *constraints, **options)
    want_out = _mean(reference(x)).detach()
    want_grads = _train_step(reference, x)
    cl.unwrap(reference)

    clear_caches()
    wrapped = cl.wrap(model, *constraints, **options)
    ctx = torch.inference_mode() if context == "inference_mode" else torch.no_grad()
    with ctx:
        seen = _mean(wrapped(x))
    # the same values in both contexts (the caches are not the only thing that must agree)
    torch.testing.assert_close(seen.clone(), want_out, rtol=1e-6, atol=1e-6)
    # then training, in the same wrapper ...
    got = _train_step(wrapped, x)
    assert got.keys() == want_grads.keys()
    for k in got:
        torch.testing.assert_close(got[k], want_grads[k], rtol=1e-5, atol=1e-6)
    cl.unwrap(wrapped)
    # ... and in another wrapper with the same condition and shape
    other = cl.wrap(make(), *constraints, **options)
    _loss(other(x)).backward()
    assert all(p.grad is not None for p in other.parameters() if p.requires_grad)


def test_inference_mode_outputs_are_exact():
    """Under inference mode the joint step holds every row (walls to the bit, total to
    rounding)."""
    clear_caches()
    torch.manual_seed(0)
    total = TOTAL(1.0)
    wrapped = cl.wrap(fno1d(), D(0.0), total)
    with torch.inference_mode():
        y = wrapped(torch.randn(3, 1, 32))
    assert bool((y[..., 0] == 0).all() and (y[..., -1] == 0).all())
    assert float(cl.metrics.conservation_error(y, total).abs().max()) < 1e-5


def test_training_then_inference_then_training_refine_float64():
    """Refine in float64: gradients after an inference call equal those before it (exact
    gradients are rebuilt in the graph; the inference-mode cache entry is never reused)."""
    torch.manual_seed(0)
    model = fno((6,), hidden=4, n_layers=2, dtype=F64)
    wrapped = cl.wrap(model, D(0.0, side="low"), N(0.0, side="high"), mode="refine")
    x = torch.randn(2, 1, 24, dtype=F64)
    before = _train_step(wrapped, x)
    with torch.inference_mode():
        wrapped(x)
        wrapped(x)  # a cached factorisation, under inference mode
    after = _train_step(wrapped, x)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=1e-12, atol=1e-12)
