"""conserve() reproduces the published ProbConserv implementation's outputs on real model outputs.

The data (../shared/data/probconserv-reference/, see its README) are the reference code's ANP
Gaussians and constrained posteriors for PME and Stefan test functions, float32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import constraint_layers as cl

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "probconserv-reference"
CASES = ["pme", "stefan"]


@pytest.fixture(params=CASES)
def ref(request):
    path = DATA / f"{request.param}.npz"
    if not path.is_file():
        pytest.skip(
            f"reference data not found at {path.resolve()} (the shared data folder is absent)"
        )
    with np.load(path) as d:
        return {k: torch.from_numpy(d[k]) for k in d.files}


def _relerr(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def constrained(ref, **kw):
    G = ref["G"].unsqueeze(-2)  # (F, 1, N): one row per test function
    mass = ref["mass"].unsqueeze(-1)  # (F, 1)
    var = ref["anp_std"].square()  # the ANP gives standard deviations
    return cl.functional.condition_gaussian(ref["anp_mean"], G, mass, variance=var, **kw)


def test_probconserv_posterior(ref):
    post = constrained(ref)
    assert post.mean.dtype == torch.float32
    assert _relerr(post.mean, ref["probconserv_mean"]) < 1e-6
    # the reference floors marginal variances at 1e-8
    assert _relerr(post.variance.clamp_min(1e-8), ref["probconserv_var"]) < 1e-6
    cov0 = post.covariance()[0]
    assert _relerr(cov0, ref["probconserv_cov_sample0"]) < 1e-6
    mass = (post.mean.double() * ref["G"].double()).sum(-1)
    assert float((mass - ref["mass"].double()).abs().max()) < 1e-7


def test_hardc_posterior(ref):
    post = constrained(ref, metric="euclidean")
    assert _relerr(post.mean, ref["hardc_mean"]) < 1e-6
    torch.testing.assert_close(post.variance, ref["hardc_var"])


def test_mixture_mean(ref):
    G, mass = ref["G"].unsqueeze(-2), ref["mass"].unsqueeze(-1)
    mix = cl.functional.conserve_mixture(
        ref["anp_mean"], G, mass, variances=ref["anp_std"].square()
    )
    assert _relerr(mix.mean, ref["mixture_mean"]) < 1e-6
    assert mix.count == ref["anp_mean"].shape[0]


def test_layer_reproduces_reference(ref):
    """The same through the integral constraint and a wrapped (mean, variance) head."""
    x = ref["x"].double()
    per_function = ref["mass"]  # rows: (batch = samples, channels = functions)

    class Head(torch.nn.Module):
        def forward(self, _):
            return ref["anp_mean"], ref["anp_std"].square()

    c = cl.Conservation.integral(per_function, grid=x)
    mean, var = cl.wrap(Head(), c)(None)
    assert _relerr(mean, ref["probconserv_mean"]) < 1e-6
    assert _relerr(var.clamp_min(1e-8), ref["probconserv_var"]) < 1e-6
