"""Keep the boundary-paper reproduction scripts working (examples/boundary_paper/).

Each script's whole pipeline (data, four models, training, evaluation, results.json, figures) runs
on a tiny configuration (``--smoke``: a few samples on a coarse grid, one batch, one seed).
The ``--full --smoke`` variants (paper grids, one batch) are marked slow.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("neuralop")
pytest.importorskip("matplotlib")

HERE = Path(__file__).resolve().parents[1] / "examples" / "boundary_paper"
sys.path.insert(0, str(HERE))

EXPERIMENTS = {  # script -> tasks it runs
    "heat": ["heat_single", "heat_frames"],
    "stokes": ["stokes"],
    "burgers": ["burgers_periodic", "burgers_dirichlet"],
    "cavity": ["cavity"],
    "refine_gradients": ["heat_single", "burgers_dirichlet"],
}
MODELS = ["fno", "output", "refine", "scalar_pivot"]
STUDY_MODELS = ["fno", "output", "refine", "refine_frozen"]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _run(script: str, tmp_path: Path, *extra: str) -> dict:
    module = importlib.import_module(script)
    module.main(["--smoke", "--threads", "1", "--out", str(tmp_path), *extra])
    return json.loads((tmp_path / script / "results.json").read_text())


def _check(payload: dict, script: str, tmp_path: Path) -> None:
    assert sorted(payload["tasks"]) == sorted(EXPERIMENTS[script])
    for name, res in payload["tasks"].items():
        assert list(res["models"]) == (STUDY_MODELS if script == "refine_gradients" else MODELS)
        for kind, r in res["models"].items():
            assert math.isfinite(r["rel_l2_mean"]), (name, kind)
            assert r["s_per_epoch_median"] > 0
            if kind != "fno":  # the output step makes every wall exact
                tol = 1e-3 if name.startswith("heat") else 1e-6
                assert max(r["boundary_max_mean"]) < tol * max(1.0, abs(r["rel_l2_mean"])), (
                    name,
                    kind,
                    r["boundary_max_mean"],
                )
        assert max(res["models"]["fno"]["boundary_max_mean"]) > 1e-3  # the base model violates
        for fig in res.get("figures", []):
            assert (tmp_path / script / fig).stat().st_size > 1000


@pytest.mark.parametrize("script", ["heat", "stokes", "burgers", "cavity"])
def test_quick_smoke(script, tmp_path):
    _check(_run(script, tmp_path), script, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["heat", "stokes", "burgers", "cavity"])
def test_full_smoke(script, tmp_path):
    """The paper-size configuration starts (paper grids and models, one batch of two)."""
    _check(_run(script, tmp_path, "--full", "--no-figures"), script, tmp_path)


def test_refine_gradient_study_records_the_derivatives(tmp_path):
    payload = _run("refine_gradients", tmp_path, "--no-figures")
    for grid in ("1d", "xt"):
        r = payload["extra"][grid]
        assert set(r) == {"plain", "refine autograd", "refine recomputed", "refine frozen"}
        assert all(math.isfinite(v) for v in r.values())


def test_combined_table(tmp_path):
    _run("stokes", tmp_path, "--no-figures")
    run_all = importlib.import_module("run_all")
    run_all.main(["--table-only", "--out", str(tmp_path), "--experiments", "stokes", "heat"])
    text = (tmp_path / "boundary_paper.md").read_text()
    assert "FNO + refine (library, exact gradients)" in text
    assert "heat.json" not in text and "missing" in text  # heat was not run here


def test_scalar_pivots_exact_for_one_channel():
    """With one hidden channel the scalar pivots ARE the boundary block: the elimination leaves
    the boundary rows equal to the boundary inputs before T1 (1D, one or two sides)."""
    from neuralop.models import FNO
    from scalar_pivot import attach_scalar_pivots

    import constraint_layers as cl

    for bcs in ([cl.Dirichlet(0.0)], [cl.Neumann(0.0, side="high")]):
        torch.manual_seed(0)
        fno = FNO(n_modes=(8,), in_channels=2, out_channels=1, hidden_channels=1,
                  positional_embedding=None, use_channel_mlp=False)  # fmt: skip
        hooks = attach_scalar_pivots(fno, bcs)
        fno(torch.randn(3, 2, 40))
        assert hooks.t1_gap < 1e-5
        assert hooks.calls == 4
        hooks.remove()
        assert not isinstance(fno.fno_blocks.non_linearity, torch.nn.Module)


def test_fno_modes_match_the_paper_convention():
    from common import fno_modes
    from neuralop.models import FNO

    fno = FNO(n_modes=fno_modes(16, 1), in_channels=1, out_channels=1, hidden_channels=4)
    assert fno.fno_blocks.convs[0].weight.shape[-1] == 16  # real-FFT frequencies 0..15
    fno = FNO(n_modes=fno_modes(12, 2), in_channels=1, out_channels=1, hidden_channels=4)
    assert tuple(fno.fno_blocks.convs[0].weight.shape[-2:]) == (24, 12)  # -12..11 and 0..11


def test_wiggle_study_runs_and_ablates_t2(capsys):
    """refine_wiggles.py: one seed, one epoch; T2's update is seen in the refined layers and
    absent with T2 switched off; the one-pass refinement is restored afterwards."""
    from constraint_layers.adapters import neuralop as neuralop_adapter

    stock = neuralop_adapter._stock_forward
    module = importlib.import_module("refine_wiggles")
    module.main(["--threads", "1", "--seeds", "0", "--variants", "refine", "t1_only",
                 "--epochs", "1"])  # fmt: skip
    assert neuralop_adapter._stock_forward is stock
    out = capsys.readouterr().out
    rows = [r.split("|") for r in out.splitlines() if r.startswith("| refine | 0 |")]
    off = [r.split("|") for r in out.splitlines() if r.startswith("| t1_only | 0 |")]
    assert rows and off
    assert all(float(r[5]) > 1.0 for r in rows)  # T2 dv_B/v_B: a large update
    assert all(float(r[5]) == 0.0 for r in off)


def test_joint_t2_study_checks_hold_on_a_small_grid():
    """refine_joint.py's fresh-layer checks: the symbol is the layer's, the joint T2 removes the
    frame residual with the pseudo-inverse, and on one axis equals the library's T2."""
    module = importlib.import_module("refine_joint")
    got = module.verify((8, 8, 4))
    assert got["symbol_vs_layer"] < 1e-12 and got["kernel_vs_impulse"] < 1e-12
    assert got["joint_rcond0_residual_ratio"] < 1e-9
    assert got["library_rcond0_residual_ratio"] > 1.0  # block Jacobi leaves it
    assert got["one_axis_0_joint_vs_library"] < 1e-10
    assert got["one_axis_1_joint_vs_library"] < 1e-10
    assert got["gradcheck_complex"] and got["gradcheck_real"]
