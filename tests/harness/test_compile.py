"""Compiled models (issue 19, item 3): ``cl.wrap(torch.compile(fno), ...)`` and
``torch.compile(cl.wrap(fno, ...))``.

``torch.compile(fno)`` returns an ``OptimizedModule`` holding the FNO as ``_orig_mod``; the
registry serves it with the adapter of the model it compiles (neuraloperator's here), so refine
works and ``save_checkpoint`` writes the FNO's own checkpoint. The fast tests need no compilation
(``torch.compile`` compiles on the first call); the tests that run compiled code are marked slow
(dynamo alone takes seconds per graph here): ``pytest -m slow tests/harness/test_compile.py``.
They use ``backend="eager"`` (dynamo's capture without code generation) except one that runs
inductor (needs a C compiler).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.adapters import find
from constraint_layers.adapters.neuralop import from_checkpoint

pytest.importorskip("neuralop")

from _models import fno
from neuralop.models import FNO

D, N = cl.Dirichlet, cl.Neumann
TOTAL = cl.Conservation.integral


def model(seed: int = 0, n_layers: int = 2) -> FNO:
    torch.manual_seed(seed)
    return fno((6,), hidden=4, n_layers=n_layers)


# --------------------------------------------------------------------------- fast: no compiling
@pytest.mark.parametrize("mode", ["output", "refine"])
def test_compiled_fno_gets_the_neuraloperator_adapter(mode):
    compiled = torch.compile(model(), backend="eager")
    wrapped = cl.wrap(compiled, D(0.0), mode=mode)
    assert wrapped.adapter.name == "neuraloperator"
    assert find(compiled) is find(compiled._orig_mod)
    assert cl.unwrap(wrapped) is compiled  # the very object
    if mode == "refine":
        assert len(wrapped.refinements) == 2  # one per Fourier layer of the compiled FNO


def test_compiled_generic_module_gets_the_generic_adapter():
    compiled = torch.compile(nn.Conv1d(1, 1, 3, padding=1), backend="eager")
    assert find(compiled) is find(nn.Conv1d(1, 1, 3))


@pytest.mark.parametrize("mode", ["output", "refine"])
def test_compiled_fno_save_checkpoint(tmp_path, mode):
    """The Trainer's save_checkpoint on a wrapped compiled FNO writes the FNO's own checkpoint:
    un-prefixed keys, read with weights_only=True; in output mode by FNO.from_checkpoint too (a
    refine checkpoint carries its marker key, which plain loading refuses by design)."""
    from constraint_layers.adapters.neuralop import REFINE_KEY

    plain = model()
    compiled = torch.compile(plain, backend="eager")
    wrapped = cl.wrap(compiled, D(0.0, side="low"), N(1.0, side="high"), mode=mode)
    wrapped.save_checkpoint(tmp_path, "model")
    state = torch.load(tmp_path / "model_state_dict.pt", weights_only=True)
    want = {k: v for k, v in plain.state_dict().items() if k != "_metadata"}
    assert (REFINE_KEY in state) == (mode == "refine")
    state.pop(REFINE_KEY, None)
    assert state.keys() == want.keys()
    for k in want:
        assert torch.equal(state[k], want[k])
    x = torch.randn(2, 1, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode == "output":
            bare = FNO.from_checkpoint(tmp_path, "model")
            torch.testing.assert_close(bare(x), plain(x), rtol=0, atol=0)
        else:
            with pytest.raises(RuntimeError, match="trained_with_constraint_layers_refine"):
                FNO.from_checkpoint(tmp_path, "model")
        again = from_checkpoint(tmp_path, "model")
    assert type(again.model) is FNO  # rebuilt eager: compile it again if wanted
    assert again.mode == mode and repr(again.bcs) == repr(wrapped.bcs)
    reference = cl.wrap(model(), *wrapped.bcs, mode=mode)
    torch.testing.assert_close(again(x), reference(x), rtol=0, atol=0)


def test_compiled_fno_load_checkpoint(tmp_path):
    source = cl.wrap(model(seed=1), D(0.0))
    source.save_checkpoint(tmp_path, "m")
    compiled = torch.compile(model(seed=2), backend="eager")
    wrapped = cl.wrap(compiled, D(0.0))
    wrapped.load_checkpoint(tmp_path, "m")
    for (k, a), b in zip(
        compiled._orig_mod.state_dict().items(), source.model.state_dict().values()
    ):
        if k != "_metadata":
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- slow: compiled runs
def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    warnings.simplefilter("ignore")  # dynamo's notes on lru_cache and graph breaks
    return w


@pytest.mark.slow
def test_compiled_fno_wrapped_refine_matches_eager():
    eager = cl.wrap(model(), D(0.0, side="low"), N(0.5, side="high"), mode="refine")
    compiled = torch.compile(model(), backend="eager")
    w = _quiet()
    try:
        before = compiled(torch.randn(2, 1, 32))  # compiled bare first: no refinement then
        wrapped = cl.wrap(compiled, D(0.0, side="low"), N(0.5, side="high"), mode="refine")
        for n in (32, 40):  # a new resolution: the refinement follows the grid
            x = torch.randn(2, 1, n)
            torch.testing.assert_close(wrapped(x), eager(x), rtol=1e-6, atol=1e-6)
        x = torch.randn(2, 1, 32)
        wrapped(x).square().mean().backward()
        eager(x).square().mean().backward()
        for a, b in zip(wrapped.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        # outside the wrapper the compiled model is the plain FNO again
        torch.testing.assert_close(compiled(x), cl.unwrap(eager)(x), rtol=1e-6, atol=1e-6)
        assert before.shape == (2, 1, 32)
    finally:
        w.__exit__(None, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["output", "refine"])
def test_compiled_wrapper_matches_eager(mode):
    total = TOTAL(1.0)
    eager = cl.wrap(model(), D(0.0), total, mode=mode)
    compiled = torch.compile(cl.wrap(model(), D(0.0), total, mode=mode), backend="eager")
    w = _quiet()
    try:
        for n in (32, 48):
            x = torch.randn(3, 1, n)
            y = compiled(x)
            torch.testing.assert_close(y, eager(x), rtol=1e-6, atol=1e-6)
            assert bool((y[..., 0] == 0).all() and (y[..., -1] == 0).all())
            assert float(cl.metrics.conservation_error(y, total).abs().max()) < 1e-5
    finally:
        w.__exit__(None, None, None)


@pytest.mark.slow
def test_compiled_wrapper_inductor():
    """The default backend (inductor: generates C++; about a minute to compile here)."""
    eager = cl.wrap(model(n_layers=1), D(0.0))
    compiled = torch.compile(cl.wrap(model(n_layers=1), D(0.0)))
    x = torch.randn(3, 1, 32)
    w = _quiet()
    try:
        y = compiled(x)
    finally:
        w.__exit__(None, None, None)
    torch.testing.assert_close(y, eager(x), rtol=1e-5, atol=1e-6)
    assert bool((y[..., 0] == 0).all() and (y[..., -1] == 0).all())
