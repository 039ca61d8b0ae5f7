"""Casts of a wrapper (issue 19, item 4).

torch's ``Module.to(torch.float64)`` (and ``.to(torch.float32)``, ``.type(...)``) turns complex
parameters real with only a UserWarning, discarding their imaginary parts: neuraloperator's
spectral weights. The bare FNO then fails at its next call; a refined wrapper used to return
boundary-exact output of another model. Wrappers refuse such a cast before anything is cast, and a
refined layer whose weights were made real behind the wrapper's back refuses to run. Casts that
keep the complex tensors (``.double()``, ``.float()``, per-tensor casts) work and agree with the
bare model cast the same way; every other cast fails or runs exactly as it does on the bare model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers._tolerance import tolerance

pytest.importorskip("neuralop")

from _models import fno, to_dtype

F32, F64 = torch.float32, torch.float64
D, N = cl.Dirichlet, cl.Neumann

LOSSY = {
    ".to(float64)": lambda m: m.to(F64),
    ".to(float32)": lambda m: m.to(F32),
    ".to(bfloat16)": lambda m: m.to(torch.bfloat16),
    ".to(dtype=float64)": lambda m: m.to(dtype=F64),
    ".to('cpu', float64)": lambda m: m.to("cpu", F64),
    ".type(float64)": lambda m: m.type(F64),
}


def model() -> nn.Module:
    torch.manual_seed(0)
    return fno((6,), hidden=4, n_layers=2)


def bcs():
    return [D(0.0, side="low"), N(1.0, side="high")]


def _snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("mode", ["output", "refine"])
@pytest.mark.parametrize("cast", list(LOSSY))
def test_lossy_cast_refused_nothing_cast(mode, cast):
    wrapped = cl.wrap(model(), *bcs(), mode=mode)
    before = _snapshot(wrapped)
    with pytest.raises(TypeError, match=r"BoundaryCorrection\.to\(torch\.\w+\).*complex.*"
                       r"imaginary parts.*Refused.*\.double\(\)"):  # fmt: skip
        LOSSY[cast](wrapped)
    after = _snapshot(wrapped)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k])
    x = torch.randn(2, 1, 24)
    torch.testing.assert_close(wrapped(x), cl.wrap(model(), *bcs(), mode=mode)(x))


def test_refine_double_is_the_float64_model():
    """``.double()`` keeps the complex weights: the refined wrapper then computes in float64 from
    the same weights, as the FNO cast to float64 throughout (complex128 weights) does."""
    wrapped = cl.wrap(model(), *bcs(), mode="refine").double()
    reference = cl.wrap(to_dtype(model(), F64), *bcs(), mode="refine")
    x = torch.randn(3, 1, 32, dtype=F64)
    with torch.no_grad():
        got, want = wrapped(x), reference(x)
    assert got.dtype == F64
    # the weights hold float32 values: their complex64 products round at float32's precision
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= tolerance(F32).reference * scale
    assert bool((got[..., 0] == 0).all())


@pytest.mark.parametrize("mode", ["output", "refine"])
def test_float64_throughout_matches_the_bare_model_cast_the_same_way(mode):
    """The per-tensor cast (real -> float64, complex -> complex128) of the wrapper equals wrapping
    the bare model cast that way, to float64 rounding; output mode equals the bare model's
    output corrected."""
    wrapped = to_dtype(cl.wrap(model(), *bcs(), mode=mode), F64)
    bare = to_dtype(model(), F64)
    reference = cl.wrap(copy.deepcopy(bare), *bcs(), mode=mode)
    x = torch.randn(3, 1, 32, dtype=F64)
    torch.testing.assert_close(wrapped(x), reference(x), rtol=1e-12, atol=1e-12)
    if mode == "output":
        want = cl.functional.enforce_boundary(bare(x), bcs())
        torch.testing.assert_close(wrapped(x), want, rtol=1e-12, atol=1e-12)


OTHER = {
    ".double()": (lambda m: m.double(), F64),
    ".float()": (lambda m: m.float(), F32),
    ".half()": (lambda m: m.half(), torch.float16),
    ".to('cpu')": (lambda m: m.to("cpu"), F32),
    ".to(complex128)": (lambda m: m.to(torch.complex128), F64),
}


@pytest.mark.parametrize("cast", list(OTHER))
def test_output_mode_casts_behave_as_the_bare_model(cast):
    """Every cast that keeps the complex tensors runs or fails on an output-mode wrapper exactly
    as on the bare model, never differently in silence."""
    how, dtype = OTHER[cast]
    x = torch.randn(2, 1, 24, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bare = how(model())
        wrapped = how(cl.wrap(model(), *bcs()))
    try:
        want = bare(x)
    except Exception as e:
        with pytest.raises(type(e)):
            wrapped(x)
        return
    torch.testing.assert_close(wrapped(x), cl.functional.enforce_boundary(want, bcs()))


def test_refine_refuses_weights_made_real_behind_the_wrapper():
    """The bare model cast after wrapping (the wrapper cannot see it): the refined layer refuses
    to run on spectral weights that lost their imaginary parts."""
    inner = model()
    wrapped = cl.wrap(inner, *bcs(), mode="refine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "discards the imaginary part"
        inner.to(F64)
    with pytest.raises(TypeError, match=r"mode='refine'.*spectral weights.*real.*imaginary"):
        wrapped(torch.randn(2, 1, 24, dtype=F64))


def test_models_without_complex_tensors_cast_as_usual():
    net = nn.Conv1d(1, 1, 3, padding=1)
    wrapped = cl.wrap(net, D(0.0)).to(F64)
    assert net.weight.dtype == F64
    y = wrapped(torch.randn(2, 1, 9, dtype=F64))
    assert y.dtype == F64 and bool((y[..., 0] == 0).all())
