"""Smoke test of examples/incompressible/cavity.py: a tiny grid, one epoch, one seed."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from constraint_layers._tolerance import tolerance

pytest.importorskip("neuralop")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "incompressible" / "cavity.py"


def _load():
    spec = importlib.util.spec_from_file_location("cavity_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("cavity_example", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def cavity():
    return _load()


def test_smoke_writes_results_and_walls_div_free_hold(cavity, tmp_path):
    cavity.main(["--smoke", "--out", str(tmp_path), "--figures", str(tmp_path / "fig")])
    payload = json.loads((tmp_path / "cavity" / "results.json").read_text())
    assert {"command", "date_utc", "environment", "config", "budget", "truth", "models"} <= set(
        payload
    )
    assert (tmp_path / "fig" / "cavity_smoke.png").is_file()
    assert set(payload["models"]) == set(cavity.MODELS)
    keys = {
        "div_gradient_max",
        "div_gradient_rms",
        "div_gradient_interior_max",
        "div_box_max",
        "wall_error_max",
        "rel_l2",
        "rel_l2_interior",
        "s_per_step",
    }
    for name, model in payload["models"].items():
        assert keys <= set(model), name
        assert {"mean", "se"} == set(model["rel_l2"])
        assert len(model["runs"]) == 1
        assert model["runs"][0]["finite"]
    rounding = tolerance(torch.float32).residual
    walls, both = payload["models"]["walls"], payload["models"]["walls_div"]
    # Dirichlet values to the bit; the divergence at every node at float32 rounding
    assert walls["wall_error_max"]["mean"] == 0.0
    assert both["wall_error_max"]["mean"] == 0.0
    assert both["div_relative_max"]["mean"] <= rounding
    # the plain FNO (random after one step) is neither
    fno = payload["models"]["fno"]
    assert fno["wall_error_max"]["mean"] > 0
    assert fno["div_relative_max"]["mean"] > rounding


def test_divergence_operators_on_known_fields(cavity):
    n = 7
    h = 1.0 / (n - 1)
    s = torch.linspace(0, 1, n, dtype=torch.float64)
    x, y = torch.meshgrid(s, s, indexing="ij")
    # u = x^2, v = -2 x y: div = 0 exactly for both operators (quadratic fields)
    field = torch.stack([x**2, -2 * x * y])[None]
    assert cavity.divergence_gradient(field, h).abs().max() < 1e-12
    assert cavity.divergence_box(field, h).abs().max() < 1e-12
    # u = x y^2: div = y^2 (the box averages y^2 over each cell's two edges)
    field = torch.stack([x * y**2, torch.zeros_like(x)])[None]
    torch.testing.assert_close(cavity.divergence_gradient(field, h)[0], y**2)
    mid = 0.5 * (y[:-1, :-1] ** 2 + y[:-1, 1:] ** 2)
    torch.testing.assert_close(cavity.divergence_box(field, h)[0], mid)


def test_wall_conditions_match_the_data(cavity):
    walls = cavity.wall_mask(5)
    assert int(walls.sum()) == 16
    side, bottom, top = cavity.wall_values(1.0, 5)
    assert side[0, 0, -1] == 1.0 and side[0, 0, :-1].abs().max() == 0
    assert (top[0, 0] == 1.0).all() and top[0, 1].abs().max() == 0
    assert bottom.abs().max() == 0


def test_data_only_reports_the_reference_data(cavity, capsys):
    out = cavity.main(["--smoke", "--data-only"])
    truth = out["truth"]
    assert {"div_gradient_lid_max", "projected_rel_l2", "div_box"} <= set(truth)
    # the data's velocity is central differences of a stream function: div-free inside
    assert truth["div_gradient_interior"]["max"] <= 1e-5
    assert 0 < truth["projected_rel_l2"] < 1
