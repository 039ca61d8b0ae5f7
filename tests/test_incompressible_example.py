"""Smoke test of the periodic Navier-Stokes example (examples/incompressible/navier_stokes.py).

Runs the script as a user does, in a subprocess, with ``--smoke`` (16 x 16 grid, 1 epoch, the
three training seeds), and checks the JSON it writes: every key the results file promises, each
constrained model's divergence at rounding under its own operator (float32 outputs: relative to
``max |u| / h``), the plain model's not, the ensemble's conditioned mean divergence-free, and the
figures written.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import constraint_layers as cl

pytest.importorskip("neuralop")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "incompressible" / "navier_stokes.py"
MODELS = ("plain", "central", "spectral", "hodge")
OPERATORS = ("central", "spectral", "gradient")
RUN_KEYS = {
    "rel_l2",
    "s_per_step",
    "steps",
    "energy_ratio_K",
    "energy_ratio_K_solver",
    "energy_rel_err_K",
    "energy_rel_err_mean",
    "steps_to_blowup",
    "rollout_rel_l2_K",
}
RUN_KEYS |= {f"div_{o}_{s}" for o in OPERATORS for s in ("max", "rms")}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("incompressible")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "navier_stokes_smoke.json").read_text()), out


def test_outputs_and_keys(results):
    res, out = results
    assert res["budget"] == "smoke"
    assert set(res["runs"]) == set(MODELS) == set(res["summary"])
    for name in MODELS:
        assert [r["seed"] for r in res["runs"][name]] == [0, 1, 2]
        for r in res["runs"][name]:
            assert RUN_KEYS <= set(r), (name, RUN_KEYS - set(r))
            assert 0 <= r["steps_to_blowup"] <= res["config"]["rollout"]
        for k, (mean, se) in res["summary"][name].items():
            assert mean == mean and se == se, (name, k)  # three seeds: no NaN
    g = res["gaussian"]
    for name in ("ensemble", "conditioned (central)", "conditioned (spectral)"):
        assert {"ll", "rel_l2", "div_central_max", "div_spectral_rms"} <= set(g[name])
    for name in ("ns_vorticity_smoke.png", "ns_divergence_smoke.png"):
        assert (out / "figures" / name).stat().st_size > 0


def test_constrained_models_divergence_free_under_their_own_operator(results):
    res, _ = results
    n = res["config"]["n"]
    # max |u| <= 10 * rms velocity; a derivative row sums to at most 1 / h = n (central) or
    # about pi n (spectral); float32 rounding 6e-8 per operation: 1e-6 leaves a margin of ~100
    # over what the constrained models give (~0.2 eps32 * max|u| * n)
    bound = 1e-6 * 10 * res["velocity_scale"] * n
    own = {"central": "central", "spectral": "spectral"}
    for name, op in own.items():
        for r in res["runs"][name]:
            assert r[f"div_{op}_max"] < bound, (name, op, r[f"div_{op}_max"], bound)
    for plain, hodge in zip(res["runs"]["plain"], res["runs"]["hodge"]):
        assert plain["div_central_max"] > 1e2 * bound  # non-vacuity
        # the re-implemented projection leaves the Nyquist modes' divergence (test below)
        assert hodge["div_spectral_max"] < 0.1 * plain["div_spectral_max"]
    # the solver's fields are spectrally divergence-free (float64)
    assert res["truth"]["div_spectral_max"] < 1e-9 * res["velocity_scale"] * n
    g = res["gaussian"]
    assert g["conditioned (central)"]["div_central_max"] < bound
    assert g["conditioned (spectral)"]["div_spectral_max"] < bound
    assert g["ensemble"]["div_central_max"] > 1e2 * bound


def _script():
    spec = importlib.util.spec_from_file_location("_incompressible_ns", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("n", [12, 16, 15])
def test_hodge_projection_is_the_spectral_option_except_at_nyquist(n):
    """The re-implemented Helmholtz-Hodge projection equals the library's spectral option on
    fields without Nyquist content (float64 rounding); with Nyquist content (even n) it differs
    there only, and is not idempotent there (the Nyquist column of rfft2 holds conjugate pairs
    whose wavevectors fftfreq does not negate)."""
    mod = _script()
    g = torch.Generator().manual_seed(n)
    u = torch.randn(3, 2, n, 13 if n == 15 else n, dtype=torch.float64, generator=g)
    lib = cl.DivergenceFree(periodic=True, stencil="spectral")
    hodge = mod.HodgeProjection(extent=1.0)
    if n % 2:  # odd n: no Nyquist mode at all
        assert torch.allclose(hodge(u), cl.functional.enforce_local(u, lib), atol=1e-13)
        return
    spec = torch.fft.fft2(u)
    spec[..., n // 2, :] = 0
    spec[..., :, n // 2] = 0
    smooth = torch.fft.ifft2(spec).real
    out = hodge(smooth)
    assert torch.allclose(out, cl.functional.enforce_local(smooth, lib), atol=1e-13)
    assert float(lib.residual(out).abs().max()) < 1e-10
    diff = (torch.fft.fft2(hodge(u)) - torch.fft.fft2(cl.functional.enforce_local(u, lib))).abs()
    off = diff.amax((0, 1)) > 1e-10
    k = torch.arange(n)
    assert bool(off.any())
    assert bool(((k == n // 2).view(-1, 1) | (k == n // 2).view(1, -1))[off].all())
    assert float((hodge(hodge(u)) - hodge(u)).abs().max()) > 1e-3
