"""`cl.Given`: constraint values supplied with each call (per-sample data of the batch)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl


def test_boundary_values_given_per_call_are_exact_and_not_passed_to_the_model():
    seen = {}

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 3, padding=1)

        def forward(self, x, **kwargs):
            seen.update(kwargs)
            return self.conv(x)

    model = cl.wrap(
        Net(), cl.Dirichlet(cl.Given("low"), side="low"), cl.Neumann(cl.Given("flux"), side="high")
    )
    low = torch.randn(4, 1)
    flux = torch.randn(4, 1)
    y = model(torch.randn(4, 1, 30), low=low, flux=flux, extra=1)
    assert torch.equal(y[:, :, 0], low)
    res = cl.functional.boundary_residuals(y, [cl.Neumann(flux, side="high")])[0][0]
    assert res.abs().max() < 1e-3
    assert seen == {"extra": 1}  # the given values went to the constraint, not the model
    with pytest.raises(ValueError, match=r"keyword argument\(s\) \['flux'\]"):
        model(torch.randn(4, 1, 30), low=low)
    with pytest.raises(ValueError, match="NaN or inf"):
        model(torch.randn(4, 1, 30), low=low, flux=torch.full((4, 1), float("nan")))
    with pytest.raises(ValueError, match="functional API needs the value itself"):
        cl.functional.enforce_boundary(torch.randn(4, 1, 30), model.bcs)


def test_given_values_feed_from_neuralop_trainer_samples():
    """The Trainer calls model(**sample): a data set whose samples carry the key feeds it."""
    pytest.importorskip("neuralop")
    import warnings

    from _models import fno
    from neuralop import Trainer
    from neuralop.losses import LpLoss

    torch.manual_seed(0)
    x, y = torch.randn(16, 2, 24), torch.randn(16, 1, 24)
    data = [{"x": a, "y": b, "wall": b[:, 0]} for a, b in zip(x, y)]  # per-sample wall value
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    model = cl.wrap(fno((6,), in_channels=2), cl.Dirichlet(cl.Given("wall"), side="low"))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, n_epochs=1, verbose=False).train(
            loader, {}, opt, torch.optim.lr_scheduler.StepLR(opt, 10), training_loss=LpLoss(d=1)
        )
    with torch.no_grad():
        pred = model(x, wall=y[:, :, 0])
    assert torch.equal(pred[:, :, 0], y[:, :, 0])


def test_conservation_total_given_per_call():
    class Head(nn.Module):
        def forward(self, x):
            return x, 0.1 + x**2

    mass = cl.Conservation.integral(cl.Given("mass"))
    model = cl.wrap(Head(), mass)
    x = torch.randn(3, 1, 17, dtype=torch.float64)
    total = torch.tensor([[1.0], [2.0], [-1.0]], dtype=torch.float64)
    mean, var = model(x, mass=total)
    err = cl.metrics.conservation_error(mean, cl.Conservation.integral(total))
    assert err.abs().max() < 1e-12
    assert model.residual((mean, var), mass=total).abs().max() < 1e-12
    assert model.posterior(x, mass=total).mean.shape == (3, 17)
    with pytest.raises(ValueError, match=r"\['mass'\]"):
        model(x)


def test_given_name_must_be_a_keyword():
    with pytest.raises(ValueError, match="identifier"):
        cl.Given("not a name")
