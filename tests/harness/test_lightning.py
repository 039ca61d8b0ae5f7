"""PyTorch Lightning, as its users run it (issue 19, item 2).

Lightning validates (and predicts) under ``torch.inference_mode()`` by default, starting with
two sanity-check validation batches before the first training step; it checkpoints the
LightningModule's ``state_dict`` with ``torch.save`` and resumes from ``ckpt_path=``. Two wrapped
models go through ``Trainer.fit`` (validation every epoch, ``ModelCheckpoint``), a resumed fit,
and ``Trainer.predict``:

- (a) a neuraloperator FNO with walls and a total (``u = 0`` at both ends, ``integral u = 1``);
- (b) a probabilistic head (``(mean, variance)``) with a conserved total (ProbConserv).

Tiny sizes, CPU, two epochs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import constraint_layers as cl

pytest.importorskip("lightning")
pytest.importorskip("neuralop")

import lightning as L
from _models import fno
from lightning.pytorch.callbacks import ModelCheckpoint

N_GRID = 17
TOTAL = cl.Conservation.integral(1.0)


class Head(nn.Module):
    """A probabilistic head on a 1D grid: ``(mean, variance)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, 8, 3, padding=1), nn.GELU(), nn.Conv1d(8, 2, 3, padding=1)
        )

    def forward(self, x):
        out = self.net(x)
        return out[:, :1], nn.functional.softplus(out[:, 1:]) + 1e-3


def data(n: int = 8, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    s = torch.linspace(0, 1, N_GRID)
    x = torch.rand(n, 1, N_GRID, generator=gen)
    bump = torch.sin(torch.pi * s) * torch.pi / 2  # integral 1, zero at both ends
    return torch.utils.data.TensorDataset(x, bump.expand(n, 1, -1).clone())


class Module(L.LightningModule):
    """A user's LightningModule around a wrapped model (deterministic or (mean, variance))."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        out = self.net(x)
        if isinstance(out, tuple):
            mean, var = out
            return nn.functional.gaussian_nll_loss(mean, y, var)
        return nn.functional.mse_loss(out, y)

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.loss(batch))

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def wrapped_fno() -> nn.Module:
    torch.manual_seed(0)
    return cl.wrap(fno((4,), hidden=4, n_layers=1), cl.Dirichlet(0.0), TOTAL)


def refined_fno() -> nn.Module:
    torch.manual_seed(0)
    return cl.wrap(fno((4,), hidden=4, n_layers=1), cl.Dirichlet(0.0), TOTAL, mode="refine")


def wrapped_head() -> nn.Module:
    torch.manual_seed(0)
    return cl.wrap(Head(), TOTAL)


MODELS = {
    "FNO walls + total": wrapped_fno,
    "refined FNO walls + total": refined_fno,
    "Gaussian head + total": wrapped_head,
}


def trainer(root: Path, epochs: int, **kw) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        check_val_every_n_epoch=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kw,
    )


def loaders(batch_size: int = 4):
    train = torch.utils.data.DataLoader(data(seed=0), batch_size=batch_size, shuffle=False)
    val = torch.utils.data.DataLoader(data(n=4, seed=1), batch_size=batch_size)
    return train, val


def check_prediction(out) -> None:
    """Every row holds on a prediction: the walls to the bit, the total to float32 rounding."""
    mean, var = out if isinstance(out, tuple) else (out, None)
    assert float(cl.metrics.conservation_error(mean, TOTAL).abs().max()) < 1e-5
    if var is None:  # the FNO has walls
        assert bool((mean[..., 0] == 0).all() and (mean[..., -1] == 0).all())
    else:
        assert bool((var >= 0).all())


def _quiet():
    w = warnings.catch_warnings()
    w.__enter__()
    # Lightning's advice (num_workers, few batches per epoch) and neuraloperator's
    warnings.filterwarnings("ignore", module=r"lightning\..*")
    warnings.filterwarnings(
        "ignore", category=UserWarning, message=r".*(num_workers|log_every_n).*"
    )
    return w


@pytest.mark.parametrize("name", list(MODELS))
def test_fit_validate_checkpoint_resume_predict(name, tmp_path):
    w = _quiet()
    try:
        train, val = loaders()
        module = Module(MODELS[name]())
        ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
        t = trainer(tmp_path, epochs=2, callbacks=[ckpt])
        assert t.predict_loop.inference_mode and t.validate_loop.inference_mode  # the default
        t.fit(module, train, val)  # sanity validation, then training, validation every epoch
        assert t.current_epoch == 2 and "val_loss" in t.callback_metrics
        assert torch.isfinite(t.callback_metrics["val_loss"])

        # the checkpoint: pure tensors and plain data, read with weights_only=True
        last = Path(ckpt.last_model_path)
        state = torch.load(last, weights_only=True)
        assert set(state["state_dict"]) == set(module.state_dict())
        assert all(k.startswith("net.model.") for k in state["state_dict"])

        # resume: a new module and trainer continue from the checkpoint
        again = Module(MODELS[name]())
        seen = {}

        class Check(L.Callback):
            def on_train_start(self, trainer, pl_module):
                seen.update({k: v.clone() for k, v in pl_module.state_dict().items()})

        t2 = trainer(tmp_path / "resume", epochs=3, callbacks=[Check()])
        t2.fit(again, train, val, ckpt_path=last)
        assert t2.current_epoch == 3
        for k, v in state["state_dict"].items():
            assert torch.equal(seen[k], v), k

        # predict (under inference_mode): every row holds
        preds = t2.predict(again, dataloaders=val)
        assert len(preds) == 1
        check_prediction(preds[0])
        # and training goes on after inference mode in the same process
        again.train()
        again.loss(next(iter(train))).backward()
    finally:
        w.__exit__(None, None, None)


def test_validate_then_train_step_outside_lightning():
    """What Lightning's loop does, by hand: a forward under inference_mode, then a training step
    of a new wrapper with the same constraints and shapes (the caches are process-wide)."""
    x = data()[:4][0]
    first = wrapped_fno()
    with torch.inference_mode():
        check_prediction(first(x))
    second = wrapped_fno()
    nn.functional.mse_loss(second(x), torch.zeros_like(x)).backward()
    assert all(p.grad is not None for p in second.parameters())
