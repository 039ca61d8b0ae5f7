"""cl.DivergenceFree inside neuraloperator's own Trainer, as a user writes it: an FNO mapping
vorticity to velocity (data from cl.problems.NavierStokes2D), a DefaultDataProcessor with
per-channel UnitGaussianNormalizers, and the one added line ``cl.wrap``."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import constraint_layers as cl

pytest.importorskip("neuralop")

from neuralop import Trainer
from neuralop.data.transforms.data_processors import DefaultDataProcessor
from neuralop.data.transforms.normalizers import UnitGaussianNormalizer
from neuralop.losses import LpLoss
from neuralop.models import FNO


def test_divergence_free_fno_trains_with_the_trainer_and_normalizers():
    ns = cl.problems.NavierStokes2D(viscosity=1e-3, extent=2 * math.pi)
    w0 = ns.initial_condition(16, 16, seed=0)
    w1 = ns.solve(w0, t=0.2, dt=0.02)
    x, y = w0.unsqueeze(1).float(), ns.velocity(w1).float()  # (16, 1, 16, 16), (16, 2, 16, 16)
    in_norm, out_norm = UnitGaussianNormalizer(dim=[0, 2, 3]), UnitGaussianNormalizer(dim=[0, 2, 3])
    in_norm.fit(x)
    out_norm.fit(y)
    processor = DefaultDataProcessor(in_normalizer=in_norm, out_normalizer=out_norm)
    torch.manual_seed(0)
    net = FNO(n_modes=(6, 6), in_channels=1, out_channels=2, hidden_channels=8)
    con = cl.DivergenceFree(periodic=True, stencil="spectral")
    model = cl.wrap(net, con, normalizer=processor, extent=2 * math.pi)
    loader = torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=8)
    trainer = Trainer(model=model, n_epochs=2, data_processor=processor, verbose=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
    before = [p.detach().clone() for p in net.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(loader, {"test": loader}, opt, sched, training_loss=LpLoss(d=2),
                      eval_losses={"l2": LpLoss(d=2)})  # fmt: skip
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    model.eval()
    with torch.no_grad():
        pred = model(in_norm.transform(x[:4]))  # normalised, as the processor gives it
        phys = out_norm.inverse_transform(pred)  # the constraint holds in physical units
    div = con.residual(phys.double(), grid=cl.GridSpec(extent=2 * math.pi))
    assert float(div.abs().max()) <= 1e-5 * float(phys.abs().max()) * 16
