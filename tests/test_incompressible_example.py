"""Smoke test of the periodic Navier-Stokes example (examples/incompressible/navier_stokes.py).

Runs the script as a user does, in a subprocess, with ``--smoke`` (16 x 16 grid, 1 epoch, the
three training seeds), and checks the JSON it writes: every key the results file promises, each
constrained model's divergence at rounding under its own operator (float32 outputs: relative to
``max |u| / h``), the plain model's not, the ensemble's conditioned mean divergence-free, and the
figures written.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    # about pi n (spectral); float32 rounding ~ 6e-8: 1e-5 leaves a wide margin
    bound = 1e-5 * 10 * res["velocity_scale"] * n
    own = {"central": "central", "spectral": "spectral", "hodge": "spectral"}
    for name, op in own.items():
        for r in res["runs"][name]:
            assert r[f"div_{op}_max"] < bound, (name, op, r[f"div_{op}_max"], bound)
    for r in res["runs"]["plain"]:  # non-vacuity
        assert r["div_central_max"] > 1e3 * bound
    # the solver's fields are spectrally divergence-free (float64)
    assert res["truth"]["div_spectral_max"] < 1e-9 * res["velocity_scale"] * n
    g = res["gaussian"]
    assert g["conditioned (central)"]["div_central_max"] < bound
    assert g["conditioned (spectral)"]["div_spectral_max"] < bound
    assert g["ensemble"]["div_central_max"] > 1e3 * bound
