"""Boundary conditions on neuraloperator models through the one `wrap` call."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

import constraint_layers as cl
from constraint_layers.testing import RESIDUAL_TOL, BoundaryLayerChecks, relative_residual

pytest.importorskip("neuralop")

from _models import fno, tfno, uno


# ------------------------------------------------------------------ the mixin, one class a model
class TestFNO1dHeatWalls(BoundaryLayerChecks):
    def make_model(self, dtype):
        return fno((8,), in_channels=2, dtype=dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 2, 48, dtype=dtype)

    def conditions(self):
        return [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]


class TestFNO2dMixed(BoundaryLayerChecks):
    def make_model(self, dtype):
        return fno((4, 4), out_channels=2, dtype=dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 16, 12, dtype=dtype)

    def conditions(self):
        return [
            cl.Dirichlet(torch.linspace(-1, 1, 12), dim=0, side="low", channels=[0]),
            cl.Neumann(0.3, dim=1, order=3),
        ]


class TestFNO3dCavityWithPadding(BoundaryLayerChecks):
    dtypes = (torch.float32,)

    def make_model(self, dtype):
        return fno((4, 4, 2), dtype=dtype, domain_padding=0.25)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 10, 10, 5, dtype=dtype)

    def conditions(self):
        lid = torch.ones(5)
        return [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1, side="low"),
                cl.Dirichlet(lid, dim=1, side="high")]  # fmt: skip


class TestTFNO2dPeriodic(BoundaryLayerChecks):
    def make_model(self, dtype):
        return tfno((4, 4), dtype=dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 14, 14, dtype=dtype)

    def conditions(self):
        return [cl.Periodic(dim=0), cl.Periodic(dim=1)]


class TestUNO1dDirichletCallable(BoundaryLayerChecks):
    def make_model(self, dtype):
        return uno(in_channels=2, dtype=dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 2, 32, dtype=dtype)

    def conditions(self):
        return [cl.Dirichlet(lambda x: x[:, :1, 0], side="low"), cl.Dirichlet(0.0, side="high")]


# ------------------------------------------------------------------------------ specific checks
def test_random_models_random_values_float32_and_float64():
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        n = int(torch.randint(20, 60, (1,), generator=gen))
        for dtype in (torch.float32, torch.float64):
            torch.manual_seed(seed)
            model = fno((int(torch.randint(2, 8, (1,), generator=gen)),), dtype=dtype)
            q_low, q_high = torch.randn(2, generator=gen).tolist()
            order = int(torch.randint(1, 4, (1,), generator=gen))
            bcs = [cl.Neumann(q_low, side="low", order=order), cl.Dirichlet(q_high, side="high")]
            y = cl.wrap(model, *bcs)(torch.randn(3, 1, n, dtype=dtype, generator=gen))
            assert relative_residual(y, bcs) <= RESIDUAL_TOL[dtype]
            assert (y[..., -1] == torch.tensor(q_high, dtype=dtype)).all()


def test_neumann_checked_by_neuralop_finite_diff():
    from neuralop.losses.differentiation import FiniteDiff

    torch.manual_seed(0)
    model = cl.wrap(
        fno((8,)), cl.Neumann(0.0, side="low", order=3), cl.Neumann(5.0, side="high", order=3)
    )
    y = model(torch.randn(4, 1, 100))
    dudx = FiniteDiff(dim=1, h=1 / 99, periodic_in_x=False).dx(y[:, 0])
    assert torch.allclose(dudx[:, 0], torch.zeros(4), atol=1e-3)  # insulated wall
    assert torch.allclose(dudx[:, -1], torch.full((4,), 5.0), atol=1e-3)  # heater
    base = FiniteDiff(dim=1, h=1 / 99, periodic_in_x=False).dx(
        cl.unwrap(model)(torch.randn(4, 1, 100))[:, 0]
    )
    assert (base[:, -1] - 5.0).abs().min() > 1e-2  # the plain FNO misses the heater flux


def test_resolution_change_stays_exact():
    torch.manual_seed(0)
    model = cl.wrap(
        fno((8,)), cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high"), extent=1.0
    )
    for n in (32, 64, 257):
        y = model(torch.randn(2, 1, n))
        assert relative_residual(y, model.bcs) <= RESIDUAL_TOL[torch.float32]


def test_checkpoint_trap_strict_plain_and_weights_only(tmp_path):
    torch.manual_seed(0)
    base = fno((8,), in_channels=2)
    wrapped = cl.wrap(base, cl.Dirichlet(1.0))
    x = torch.randn(2, 2, 32)
    # the plain model's state dict carries neuraloperator's `_metadata` entry (init kwargs)
    assert "_metadata" in base.state_dict()
    sd = wrapped.state_dict()
    assert all(k.startswith("model.") for k in sd)
    # 1. strict round trip through a weights_only load
    torch.save(sd, tmp_path / "wrapped.pt")
    fresh = cl.wrap(fno((8,), in_channels=2), cl.Dirichlet(1.0))
    fresh.load_state_dict(torch.load(tmp_path / "wrapped.pt", weights_only=True), strict=True)
    assert torch.equal(fresh(x), wrapped(x))
    # 2. a plain neuraloperator checkpoint (save_checkpoint / from_checkpoint) into a wrapper, and back
    base.save_checkpoint(tmp_path, "fno")
    from neuralop.models import FNO

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        restored = cl.wrap(FNO.from_checkpoint(tmp_path, "fno"), cl.Dirichlet(1.0))
    assert torch.equal(restored(x), wrapped(x))
    other = cl.wrap(fno((8,), in_channels=2), cl.Dirichlet(1.0))
    plain = torch.load(tmp_path / "fno_state_dict.pt", weights_only=False)
    other.load_state_dict(plain, strict=True)
    assert "_metadata" in plain, "the caller's state dict was changed by the load"
    assert torch.equal(other(x), wrapped(x))
    cl.unwrap(other).save_checkpoint(tmp_path, "back")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = FNO.from_checkpoint(tmp_path, "back")
    assert torch.equal(cl.wrap(again, cl.Dirichlet(1.0))(x), wrapped(x))
    # 3. weights_only refuses neuraloperator's own file but accepts the wrapper's
    buf = io.BytesIO()
    torch.save(wrapped.state_dict(), buf)
    buf.seek(0)
    torch.load(buf, weights_only=True)


def test_gradcheck_into_model_parameters_and_values():
    torch.manual_seed(0)
    model = fno((4,), hidden=4, dtype=torch.float64)
    q = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    weight = model.projection.fcs[-1].weight

    def f(w, q):
        with torch.nn.utils.stateless._reparametrize_module(model, {"projection.fcs.1.weight": w}):
            return cl.BoundaryCorrection(model, [cl.Neumann(q, side="high", order=3)])(x)

    assert torch.autograd.gradcheck(f, (weight.detach().clone().requires_grad_(), q))


def test_training_with_neuralop_trainer_and_normalizer():
    from neuralop import Trainer
    from neuralop.data.transforms.data_processors import DefaultDataProcessor
    from neuralop.data.transforms.normalizers import UnitGaussianNormalizer
    from neuralop.losses import LpLoss

    torch.manual_seed(0)
    n, grid = 32, 40
    xs = torch.linspace(0, 1, grid)
    omega = 2 + 2 * torch.rand(n, 1)
    u0 = torch.cos(omega * torch.pi * xs)
    x = torch.stack([u0, xs.expand(n, -1)], dim=1)
    y = (u0 * 3 + 10 + xs * 5).unsqueeze(1)  # physical units far from normalised ones
    data = [{"x": a, "y": b} for a, b in zip(x, y)]
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    normalizer = UnitGaussianNormalizer(dim=[0, 2])
    normalizer.fit(y)
    processor = DefaultDataProcessor(out_normalizer=normalizer)
    bcs = [cl.Neumann(0.0, side="low"), cl.Dirichlet(13.0, side="high")]
    model = cl.wrap(fno((8,), in_channels=2), *bcs, normalizer=processor)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = LpLoss(d=1)
    trainer = Trainer(model=model, n_epochs=2, data_processor=processor, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(loader, {"test": loader}, opt, torch.optim.lr_scheduler.StepLR(opt, 10),
                      training_loss=loss, eval_losses={"l2": loss})  # fmt: skip
    model.eval()
    with torch.no_grad():
        pred = normalizer.inverse_transform(model(x))  # what the processor does in eval
    err = cl.metrics.boundary_error(pred, bcs)
    assert float(err[1]) < 1e-5 * 13  # Dirichlet in physical units, to float32 rounding
    assert relative_residual(pred, bcs) <= 1e-5


def test_wrap_with_unknown_mode_or_options_fails_clearly():
    with pytest.raises(ValueError, match="mode must be one of"):
        cl.wrap(fno((4,)), cl.Dirichlet(0.0), mode="kernel")
    with pytest.raises(TypeError, match="unexpected keyword"):
        cl.wrap(fno((4,)), cl.Dirichlet(0.0), spacingg=0.1)
    with pytest.raises(TypeError, match="normalizer must have transform"):
        cl.wrap(fno((4,)), cl.Dirichlet(0.0), normalizer=3)
