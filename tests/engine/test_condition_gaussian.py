"""The Gaussian conditioning kernel is named for what it does; ``conserve`` is its deprecated
alias: it warns, gives the same result and names itself in error messages."""

from __future__ import annotations

import pytest
import torch

import constraint_layers as cl

F64 = torch.float64


def _problem(dtype):
    g = torch.Generator().manual_seed(3)
    mu = torch.randn(3, 12, generator=g, dtype=F64).to(dtype)
    var = (0.1 + torch.rand(3, 12, generator=g, dtype=F64)).to(dtype)
    G = torch.randn(2, 12, generator=g, dtype=F64)
    b = torch.randn(3, 2, generator=g, dtype=F64)
    return mu, var, G, b


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_conserve_is_a_deprecated_alias(dtype):
    mu, var, G, b = _problem(dtype)
    new = cl.functional.condition_gaussian(mu, G, b, variance=var)
    with pytest.warns(DeprecationWarning, match="condition_gaussian"):
        old = cl.functional.conserve(mu, G, b, variance=var)
    assert torch.equal(old.mean, new.mean) and torch.equal(old.variance, new.variance)
    assert old.mean.dtype == dtype
    tol = 1e-12 if dtype == F64 else 1e-5
    res = old.mean.to(F64) @ G.mT - b
    assert float(res.abs().max()) <= tol * float(b.abs().max() + mu.abs().max() * 12)


def test_the_kernel_warns_nothing_and_messages_name_the_call():
    mu, var, G, b = _problem(F64)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^conserve: "):
        cl.functional.conserve(mu, G[:, :5], b, variance=var)
    with pytest.raises(ValueError, match=r"^condition_gaussian: "):
        cl.functional.condition_gaussian(mu, G[:, :5], b, variance=var)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cl.functional.condition_gaussian(mu, G, b, variance=var)


def test_the_old_module_path_still_imports():
    from constraint_layers.conservation.conserve import condition_gaussian, conserve

    assert condition_gaussian is cl.functional.condition_gaussian
    assert conserve is cl.functional.conserve
