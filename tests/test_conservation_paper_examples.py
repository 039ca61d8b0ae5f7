"""Smoke test of the conservation-paper reproduction (examples/conservation_paper/).

Runs the whole pipeline (three problems; ANP, SoftC-ANP, GP and ensemble black boxes; HardC and
ProbConserv through the library's layer; noise sweep, shock positions, figures) on a tiny
configuration in a subprocess, as a user runs it, and checks the outputs: every constrained model
conserves the analytic mass at t* to float64 rounding on every test function, the unconstrained
ones do not, and the result files are written.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gpytorch")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "conservation_paper" / "run.py"
FILES = (
    "results.json",
    "tables.md",
    "conservation_of_mass.png",
    "uncertainty_stefan.png",
    "shock_position.png",
    "noise_sweep.png",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("conservation_paper")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


def test_outputs_written(results):
    res, out = results
    for name in FILES:
        assert (out / name).stat().st_size > 0, name
    # diffusion k in {1, 5}, PME m in {1, 3, 6}, Stefan u* in {0.5, 0.6}
    assert len(res["cases"]) == 7


def test_constrained_models_conserve_to_rounding(results):
    res, _ = results
    for label, case in res["cases"].items():
        for name, row in case["table"].items():
            if name.startswith(("HardC-", "ProbConserv-")):
                # the GP too: conserve() polishes whenever G mean = b misses float64 rounding
                # (its G Sigma G^T over the time rows is ill-conditioned, cond ~ 1e9)
                assert row["CE_max_abs"] < 1e-12, (label, name, row["CE_max_abs"])
        # non-vacuity: the unconstrained black boxes miss the mass
        for name in ("ANP", "GP", "Ensemble"):
            assert case["table"][name]["CE_max_abs"] > 1e-6, (label, name)


def test_noise_sweep_limits(results):
    res, _ = results
    for label, sw in res["noise_sweep"].items():
        assert sw["noise"][0] == 0 and math.isinf(sw["noise"][-1])
        assert abs(sw["CE"][0][0]) < 1e-12, label  # noise 0: ProbConserv
        anp = res["cases"][label]["table"]["ANP"]
        assert sw["MSE"][-1][0] == pytest.approx(anp["MSE"][0], rel=1e-9), label  # inf: the ANP
        assert sw["CE"][-1][0] == pytest.approx(anp["CE"][0], rel=1e-9, abs=1e-15), label


def test_shock_positions_read_from_the_grid(results):
    res, _ = results
    assert set(res["shock"]) == {k for k in res["cases"] if not k.startswith("Diffusion")}
    for sh in res["shock"].values():
        for name in ("ANP", "ProbConserv-ANP"):
            pos = [p for p in sh[name]["positions"] if not math.isnan(p)]
            assert all(0.0 <= p <= 1.0 for p in pos)


@pytest.mark.slow
def test_full_budget_starts(tmp_path):
    """``--full --smoke``: the paper's architecture (1.1e6 parameters), data (10,000 training
    functions, batch 250) and inference (100 latent samples), two optimiser steps per model."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--full", "--smoke", "--problems", "stefan",
         "--out", str(tmp_path), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["training"]["stefan"]["anp_parameters"] > 1_000_000
    assert res["config"]["n_train"] == 10_000 and res["config"]["latent_samples"] == 100
    for case in res["cases"].values():
        assert case["table"]["ProbConserv-ANP"]["CE_max_abs"] < 1e-12
