"""The point-cloud examples run (smoke: tiny budgets)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pointcloud"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_pc_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_cylinder_setup_and_one_evaluation():
    pytest.importorskip("neuralop")
    mod = _load("cylinder")
    _, train, test, coords, latent = mod.setup(True)
    net = mod._gino(0)
    wrapped = mod.cl.wrap(net, *mod.constraints(train))
    out = mod.evaluate(wrapped, test, coords, latent, True)
    assert out["surface_un"] < 1e-5  # no penetration holds before any training
    plain = mod.evaluate(net, test, coords, latent, False)
    assert plain["surface_un"] > 1e-3


def test_gp_scattered_one_seed():
    pytest.importorskip("gpytorch")
    pytest.importorskip("scipy")
    mod = _load("gp_scattered")
    out = mod.run(0, 3.0, frames=(0.5, 1.0), per_frame=10, n_train=30)
    assert out["GP + conservation"]["ce"] < 1e-10
    assert out["GP"]["ce"] > 1e-6
