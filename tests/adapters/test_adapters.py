"""The adapter registry, `wrap` / `unwrap`, the generic adapter and import hygiene."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.errors import NoAdapterError
from constraint_layers.testing import BoundaryLayerChecks


class TestConv1dGeneric(BoundaryLayerChecks):
    def make_model(self, dtype):
        return nn.Sequential(
            nn.Conv1d(2, 4, 5, padding=2), nn.Tanh(), nn.Conv1d(4, 1, 5, padding=2)
        ).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 2, 30, dtype=dtype)

    def conditions(self):
        return [cl.Dirichlet(0.25, side="low"), cl.Neumann(-1.0, side="high", order=1)]


class TestConv3dGenericPerSampleValues(BoundaryLayerChecks):
    def make_model(self, dtype):
        return nn.Conv3d(1, 2, 3, padding=1).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 8, 7, 6, dtype=dtype)

    def conditions(self):
        return [
            cl.Neumann(lambda x: x[:, :, 0].mean(dim=(2, 3), keepdim=True), dim=0, side="low"),
            cl.Periodic(dim=2, channels=1),
        ]


class TestConv2dLiftAndExtent(BoundaryLayerChecks):
    def make_model(self, dtype):
        return nn.Conv2d(1, 1, 3, padding=1).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 24, 20, dtype=dtype)

    def conditions(self):
        return [cl.Dirichlet(1.0, dim=0), cl.Neumann(2.0, dim=1, order=3)]

    def options(self):
        return {"lift": 4, "extent": (2.0, 3.0)}


# ------------------------------------------------------------------------------------ registry
class Dicty(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)

    def forward(self, x):
        return {"u": self.conv(x), "aux": x.sum()}


class SubDicty(Dicty):
    pass


def test_user_adapter_is_preferred_over_the_generic_one():
    @cl.adapters.register(Dicty)
    class DictyAdapter(cl.adapters.Adapter):
        name = "test-dicty"

        def read(self, output):
            return super().read(output["u"])

        def write(self, output, prediction):
            return {**output, "u": prediction.mean}

    try:
        model = SubDicty()  # found through the MRO
        assert cl.adapters.find(model).name == "test-dicty"
        out = cl.wrap(model, cl.Dirichlet(3.0))(torch.randn(2, 1, 9))
        assert set(out) == {"u", "aux"} and (out["u"][..., 0] == 3).all()
        with pytest.raises(ValueError, match="already has the adapter 'test-dicty'"):
            cl.adapters.register(Dicty)(type("Again", (cl.adapters.Adapter,), {"name": "again"}))
    finally:
        cl.adapters.unregister(DictyAdapter)
    assert cl.adapters.find(SubDicty()).name == "torch.nn.Module"
    with pytest.raises(TypeError, match="a dict output needs a mean"):
        cl.wrap(SubDicty(), cl.Dirichlet(3.0))(torch.randn(2, 1, 9))


def test_registry_rejects_bad_registrations():
    with pytest.raises(TypeError, match="subclass of constraint_layers.adapters.Adapter"):
        cl.adapters.register(Dicty)(object)
    with pytest.raises(ValueError, match="names no model types"):
        cl.adapters.register()(type("NoTargets", (cl.adapters.Adapter,), {}))
    with pytest.raises(ValueError, match="dotted path"):
        cl.adapters.register("Dicty")


def test_unknown_model_type_lists_the_registered_adapters():
    with pytest.raises(NoAdapterError, match="Registered: .*torch.nn.modules.module.Module"):
        cl.adapters.find(object())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cl.BoundaryCorrection(lambda x: x, [cl.Dirichlet()])


def test_wrap_and_unwrap_errors():
    with pytest.raises(ValueError, match="at least one constraint"):
        cl.wrap(nn.Conv1d(1, 1, 1))
    with pytest.raises(TypeError, match="expected constraints"):
        cl.wrap(nn.Conv1d(1, 1, 1), "dirichlet")
    with pytest.raises(TypeError, match="unwrap: expected a wrapper"):
        cl.unwrap(nn.Conv1d(1, 1, 1))


def test_debug_mode_verifies_every_call():
    model = cl.wrap(nn.Conv1d(1, 1, 3, padding=1), cl.Neumann(1.0), debug=True)
    model(torch.randn(2, 1, 20))  # passes: the correction is exact
    # the check itself flags an output that violates the conditions
    with pytest.raises(cl.errors.ConstraintViolationError, match="residual"):
        model._check(cl.functional.Gaussian(torch.zeros(2, 1, 20), event_ndim=2), None, model.bcs)


def _run(code: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = None
    if env_path is not None:
        import os

        env = {**os.environ, "PYTHONPATH": env_path}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_import_pulls_in_no_model_library():
    proc = _run(
        """
        import sys, torch
        import constraint_layers as cl
        cl.wrap(torch.nn.Conv1d(1, 1, 1), cl.Dirichlet(0.0))
        bad = [m for m in ("neuralop", "gpytorch", "linear_operator", "tensorly") if m in sys.modules]
        print("LOADED", bad)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "LOADED []" in proc.stdout


def test_third_party_adapter_through_entry_point(tmp_path):
    pkg = tmp_path / "myplugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(
        """
        import torch
        import constraint_layers as cl

        class PairNet(torch.nn.Module):
            def forward(self, x):
                return (x * 2, "extra")

        class PairAdapter(cl.adapters.Adapter):
            name = "myplugin-pair"
            targets = ("myplugin.PairNet",)
            def read(self, output):
                return super().read(output[0])
            def write(self, output, prediction):
                return (prediction.mean, output[1])
        """
    ))  # fmt: skip
    dist = tmp_path / "myplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[constraint_layers.adapters]\npair = myplugin:PairAdapter\n"
    )
    proc = _run(
        """
        import torch, constraint_layers as cl, myplugin
        wrapped = cl.wrap(myplugin.PairNet(), cl.Dirichlet(5.0))
        out = wrapped(torch.zeros(1, 1, 4))
        print(wrapped.adapter.name, out[1], out[0][0, 0].tolist())
        """,
        env_path=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "myplugin-pair extra [5.0, 0.0, 0.0, 5.0]" in proc.stdout


def test_wrapper_is_an_ordinary_module():
    net = nn.Conv1d(1, 1, 3, padding=1)
    wrapped = cl.wrap(net, cl.Dirichlet(0.0))
    assert list(wrapped.parameters()) == list(net.parameters())
    assert "Dirichlet(0.0, side='both')" in repr(wrapped)
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    loss = wrapped(torch.randn(4, 1, 16)).pow(2).mean()
    loss.backward()
    opt.step()
    assert (wrapped(torch.randn(4, 1, 16))[..., [0, -1]] == 0).all()
    assert cl.unwrap(wrapped) is net
