"""Keep ``examples/joint_constraints.py`` working and its claims true.

The example's smallest configuration (``--smoke``: a few samples on 33 nodes, two optimiser
steps, one seed; a GP on a 5 x 17 grid) runs in a few seconds. The joint wrapper must hold every
row (boundary and conservation) to rounding, while each nested composition breaks the rows of the
wrapper that ran first, so the joint checks are not vacuous.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("neuralop")
pytest.importorskip("gpytorch")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "joint_constraints.py"

# float32 heat data on 33 nodes (h = 1/32): a flux residual of rounding size is about
# eps * max|u| / h ~ 1e-5 at worst; the totals are sums of 33 float32 values of size <= 1
F32_FLUX_TOL = 1e-4
F32_TOTAL_TOL = 1e-6
F64_TOL = 1e-12
VIOLATED = 1e-4  # what a broken row measures at least (observed: 7e-4 to 0.2)


def _load():
    spec = importlib.util.spec_from_file_location("joint_constraints_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load()


@pytest.fixture(scope="module")
def payload(example, tmp_path_factory):
    out = tmp_path_factory.mktemp("joint")
    threads = torch.get_num_threads()
    try:
        example.main(["--smoke", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    path = out / "joint_constraints" / "results.json"
    return json.loads(path.read_text()), path.parent


def test_heat_joint_holds_every_row_and_nesting_breaks_one(payload):
    heat = payload[0]["heat"]["models"]
    assert list(heat) == ["plain", "boundary", "conservation", "seq_bc", "seq_cb", "joint"]
    joint = heat["joint"]
    assert joint["boundary_error_mean"] < F32_FLUX_TOL
    assert joint["conservation_error_mean"] < F32_TOTAL_TOL
    # walls then total: the Euclidean total step moves the wall nodes and breaks the flux
    assert heat["seq_bc"]["conservation_error_mean"] < F32_TOTAL_TOL
    assert heat["seq_bc"]["boundary_error_mean"] > VIOLATED
    # total then walls: the flux step moves the wall nodes and breaks the total
    assert heat["seq_cb"]["boundary_error_mean"] < F32_FLUX_TOL
    assert heat["seq_cb"]["conservation_error_mean"] > VIOLATED
    # one family alone holds its own rows only; the plain model none
    assert heat["boundary"]["boundary_error_mean"] < F32_FLUX_TOL
    assert heat["boundary"]["conservation_error_mean"] > VIOLATED
    assert heat["conservation"]["conservation_error_mean"] < F32_TOTAL_TOL
    assert heat["conservation"]["boundary_error_mean"] > VIOLATED
    assert heat["plain"]["boundary_error_mean"] > VIOLATED
    assert heat["plain"]["conservation_error_mean"] > VIOLATED
    for r in heat.values():
        assert 0 < r["rel_l2_mean"] < 10


def test_heat_data_conserve_their_total(payload):
    checks = payload[0]["heat"]["data_checks"]
    assert checks["data_total_vs_sinc_omega"] < 1e-6  # float32 data, exact total sinc(omega)
    # the input's trapezoid total is not the conserved total: why the total is given per sample
    assert checks["input_total_vs_sinc_omega"] > 1e-5


def test_gp_joint_closes_the_band_at_the_walls_and_conserves(payload):
    gp = payload[0]["gp"]["models"]
    joint = gp["joint"]
    assert joint["ce_mean"] < F64_TOL
    assert joint["wall_error_mean"] < F64_TOL
    assert joint["wall_var_mean"] < F64_TOL
    assert gp["plain"]["ce_mean"] > VIOLATED and gp["plain"]["wall_error_mean"] > VIOLATED
    assert gp["walls"]["wall_error_mean"] < F64_TOL and gp["walls"]["ce_mean"] > VIOLATED
    assert gp["mass"]["ce_mean"] < F64_TOL and gp["mass"]["wall_error_mean"] > VIOLATED
    # Gaussian conditioning composes: nested exact conditioning agrees with the joint one
    for kind in ("seq_wm", "seq_mw"):
        assert gp[kind]["ce_mean"] < F64_TOL
        assert gp[kind]["wall_error_mean"] < F64_TOL
        assert gp[kind]["mse_mean"] == pytest.approx(joint["mse_mean"], rel=1e-6)


def test_figures_and_command_are_written(payload):
    data, out_dir = payload
    assert data["command"].startswith("python examples/joint_constraints.py --smoke")
    for part in ("heat", "gp"):
        for name in data[part]["figures"]:
            assert (out_dir / name).stat().st_size > 1000


def test_results_are_reproducible_from_the_seed(example, tmp_path):
    threads = torch.get_num_threads()
    try:
        runs = [
            example.main(["--smoke", "--parts", "heat", "--no-figures", "--out", str(tmp_path)])
            for _ in range(2)
        ]
    finally:
        torch.set_num_threads(threads)
    a, b = (r["heat"]["models"] for r in runs)
    for kind in a:
        for key in ("boundary_error", "conservation_error", "rel_l2"):
            assert a[kind]["runs"][0][key] == b[kind]["runs"][0][key], (kind, key)


def test_gpytorch_variance_is_zero_at_dirichlet_nodes_without_warning():
    import warnings

    import gpytorch

    import constraint_layers as cl

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = gpytorch.kernels.RBFKernel()

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    x = torch.linspace(0.1, 0.9, 10, dtype=torch.float64)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    gp = GP(x, torch.sin(6 * x), likelihood).double().eval()
    model = cl.wrap(gp, cl.Dirichlet(0.0))
    with torch.no_grad():
        post = model(torch.linspace(0, 1, 33, dtype=torch.float64))
        assert post.lazy_covariance_matrix.diagonal()[[0, -1]].tolist() == [0.0, 0.0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no NumericalWarning for a documented use
            variance = post.variance
    assert variance[[0, -1]].tolist() == [0.0, 0.0]
