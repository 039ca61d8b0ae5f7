"""A wrapped neuraloperator model inside neuraloperator's own tools (issue 11, items 1-5).

Written the way a user writes it: neuraloperator's Darcy recipe in miniature (an FNO, the
``Trainer``, a ``DefaultDataProcessor`` with input and output ``UnitGaussianNormalizer``s, H1
loss), u = 0 on the whole boundary, and the one added line ``model = cl.wrap(model, ...)``.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch

import constraint_layers as cl

pytest.importorskip("neuralop")

from neuralop import Trainer
from neuralop.data.transforms.data_processors import DefaultDataProcessor
from neuralop.data.transforms.normalizers import UnitGaussianNormalizer
from neuralop.losses import H1Loss, LpLoss
from neuralop.models import FNO

from constraint_layers.adapters.neuralop import SIDECAR_SUFFIX, from_checkpoint

GRID = (12, 12)
#: What issue 10 ("One constraint engine") brings to the layer; these tests verify it once merged.


# ------------------------------------------------------------------------------------ helpers
def walls() -> list[cl.BoundaryCondition]:
    """u = 0 on the whole boundary of a 2D grid."""
    return [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1)]


def make_fno(seed: int = 0) -> FNO:
    torch.manual_seed(seed)
    return FNO(n_modes=(4, 4), in_channels=1, out_channels=1, hidden_channels=8)


def make_data(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Darcy-like pairs in physical units, far from normalised ones; u vanishes on the walls."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 1, *GRID, generator=gen) * 9 + 3
    s = torch.linspace(0, 1, GRID[0])
    bump = torch.sin(torch.pi * s)[:, None] * torch.sin(torch.pi * s)[None, :]
    u = (a.mean(dim=(2, 3), keepdim=True) * 0.1 + 0.02 * a) * bump
    return a, u


def make_loader(x: torch.Tensor, y: torch.Tensor) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader([{"x": a, "y": b} for a, b in zip(x, y)], batch_size=8)


def make_processor(x: torch.Tensor, y: torch.Tensor) -> DefaultDataProcessor:
    in_norm, out_norm = UnitGaussianNormalizer(dim=[0, 2, 3]), UnitGaussianNormalizer(dim=[0, 2, 3])
    in_norm.fit(x)
    out_norm.fit(y)
    return DefaultDataProcessor(in_normalizer=in_norm, out_normalizer=out_norm)


def train(model, processor, loader, n_epochs: int, **train_kwargs) -> Trainer:
    """neuraloperator's Trainer, as its Darcy recipe runs it (a few epochs)."""
    trainer = Trainer(model=model, n_epochs=n_epochs, data_processor=processor, verbose=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=100)
    with warnings.catch_warnings():
        # neuraloperator warns about the extra `y` keyword to FNO.forward, among others
        warnings.simplefilter("ignore")
        trainer.train(loader, {"test": loader}, opt, sched, training_loss=H1Loss(d=2),
                      eval_losses={"h1": H1Loss(d=2), "l2": LpLoss(d=2)}, **train_kwargs)  # fmt: skip
    return trainer


def boundary(u: torch.Tensor) -> torch.Tensor:
    """The four faces of a (batch, channels, n, m) grid, flattened."""
    return torch.cat([u[..., 0, :], u[..., -1, :], u[..., :, 0], u[..., :, -1]], dim=-1)


def physical(processor: DefaultDataProcessor, model, x: torch.Tensor) -> torch.Tensor:
    """What the Trainer evaluates: the model on normalised inputs, output un-normalised."""
    model.eval()
    with torch.no_grad():
        return processor.out_normalizer.inverse_transform(
            model(processor.in_normalizer.transform(x))
        )


def assert_walls_hold(u: torch.Tensor, scale: float) -> None:
    """u = 0 on the boundary to float32 rounding of the normalise / un-normalise round trip."""
    assert float(boundary(u).abs().max()) <= 1e-5 * scale


@contextlib.contextmanager
def quiet():
    """Silence neuraloperator's version and keyword warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------- item 1: Trainer save_every / save_best
def test_trainer_save_every_checkpoints_a_wrapper_that_reloads_identical(tmp_path: Path):
    x, y = make_data()
    processor = make_processor(x, y)
    model = cl.wrap(make_fno(), *walls(), normalizer=processor)
    train(model, processor, make_loader(x, y), n_epochs=2, save_every=1, save_dir=tmp_path)

    files = {p.name for p in tmp_path.iterdir()}
    assert {"model_state_dict.pt", "model_metadata.pkl", f"model{SIDECAR_SUFFIX}"} <= files
    expected = physical(processor, model, x)
    assert_walls_hold(expected, float(y.abs().max()))

    # the wrapper comes back identical: layer, conditions, options, weights
    again = from_checkpoint(tmp_path, "model", normalizer=processor)
    assert type(again) is type(model)
    assert repr(again.bcs) == repr(model.bcs) and again.extra_repr() == model.extra_repr()
    assert again.normalizer is processor
    assert torch.equal(physical(processor, again, x), expected)
    # the same through the wrapper's own method, neuraloperator style
    assert torch.equal(physical(processor, model.from_checkpoint(tmp_path, "model",
                                                                 normalizer=processor), x), expected)  # fmt: skip

    # no lock-in: the model's files are a plain neuraloperator checkpoint, weights_only readable
    with quiet():
        plain = FNO.from_checkpoint(tmp_path, "model")
    xn = processor.in_normalizer.transform(x)
    with torch.no_grad():
        assert torch.equal(plain(xn), cl.unwrap(model)(xn))
    state = torch.load(tmp_path / "model_state_dict.pt", weights_only=True)
    assert state.keys() == {k for k in plain.state_dict() if k != "_metadata"}


def test_trainer_save_best_checkpoints_the_wrapper(tmp_path: Path):
    x, y = make_data()
    processor = make_processor(x, y)
    model = cl.wrap(make_fno(), *walls(), normalizer=processor)
    train(model, processor, make_loader(x, y), n_epochs=3, save_best="test_l2", save_dir=tmp_path)

    assert (tmp_path / f"best_model{SIDECAR_SUFFIX}").exists()
    best = from_checkpoint(tmp_path, "best_model", normalizer=processor)
    with quiet():
        by_hand = cl.wrap(FNO.from_checkpoint(tmp_path, "best_model"), *walls(),
                          normalizer=processor)  # fmt: skip
    u = physical(processor, best, x)
    assert torch.equal(u, physical(processor, by_hand, x))
    assert_walls_hold(u, float(y.abs().max()))


def test_load_checkpoint_loads_weights_in_place_and_keeps_the_conditions(tmp_path: Path):
    x = torch.randn(3, 1, *GRID)
    source = cl.wrap(make_fno(0), *walls())
    source.save_checkpoint(tmp_path, "w")
    target = cl.wrap(make_fno(1), cl.Dirichlet(1.0, dim=0))
    params = list(target.parameters())
    assert not torch.equal(target(x), cl.wrap(make_fno(0), cl.Dirichlet(1.0, dim=0))(x))
    with quiet():
        target.load_checkpoint(tmp_path, "w")
    assert all(p is q for p, q in zip(target.parameters(), params))  # optimizers stay valid
    assert torch.equal(target(x), cl.wrap(make_fno(0), cl.Dirichlet(1.0, dim=0))(x))
    assert (target(x)[..., 0, :] == 1.0).all()  # its own condition, not the checkpoint's

    # a plain neuraloperator checkpoint loads the same way
    make_fno(0).save_checkpoint(tmp_path, "plain")
    other = cl.wrap(make_fno(2), *walls())
    with quiet():
        other.load_checkpoint(tmp_path, "plain")
    assert torch.equal(other(x), source(x))


# ------------------------------------------------------- item 5: resume, side by side with plain
def _build(kind: str, seed: int, processor: DefaultDataProcessor) -> torch.nn.Module:
    fno = make_fno(seed)
    if kind == "plain":
        return fno
    from constraint_layers.adapters.neuralop import NormalisedUnits

    # "wrapped": the conditions stated in normalised units, deliberately (issue 19: a wrapper
    # without normalizer= is refused by the Trainer when the processor normalises the outputs)
    norm = processor if kind == "wrapped+normalizer" else NormalisedUnits()
    return cl.wrap(fno, *walls(), normalizer=norm)


@pytest.mark.parametrize(
    "kind",
    ["plain", "wrapped", "wrapped+normalizer"],
)
def test_trainer_resume_continues_training_exactly(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    x, y = make_data()
    processor = make_processor(x, y)
    loader = make_loader(x, y)
    first = _build(kind, 0, processor)
    train(first, processor, loader, n_epochs=2, save_every=1, save_dir=tmp_path)

    resumed = _build(kind, 1, processor)  # other initial weights: the checkpoint must replace them
    if kind == "plain":
        # neuraloperator's own state-dict file holds the model's init kwargs (F.gelu,
        # SpectralConv, ...) and its Trainer reads it with torch.load's default weights_only=True
        # (torch >= 2.6), which refuses them: the plain model resumes only with torch's
        # documented opt-out. The wrapper writes pure tensors and resumes as it is.
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer = train(resumed, processor, loader, n_epochs=3, resume_from_dir=tmp_path)
    assert trainer.model is resumed  # loaded in place
    # the run is the uninterrupted one with as many epochs (neuraloperator re-runs the saved one)
    epochs = 2 + 3 - trainer.start_epoch
    reference = _build(kind, 0, processor)
    train(reference, processor, loader, n_epochs=epochs)
    for p, q in zip(resumed.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if kind != "plain":
        u = physical(processor, resumed, x)
        if kind == "wrapped":  # the conditions hold in the model's (normalised) units, exactly
            resumed.eval()
            with torch.no_grad():
                assert (boundary(resumed(processor.in_normalizer.transform(x))) == 0).all()
        else:
            assert_walls_hold(u, float(y.abs().max()))


# --------------------------------------------------------------------- sidecar: what is saved
def test_from_checkpoint_says_what_to_pass_again(tmp_path: Path):
    x, y = make_data()
    processor = make_processor(x, y)
    cl.wrap(make_fno(), *walls(), normalizer=processor).save_checkpoint(tmp_path, "n")
    with pytest.raises(ValueError, match="normalizer=data_processor"):
        from_checkpoint(tmp_path, "n")
    dropped = from_checkpoint(tmp_path, "n", normalizer=None)  # a deliberate choice
    assert dropped.normalizer is None

    # a callable value is code, not data: the weights are saved, the user is told what to pass
    lam = cl.wrap(make_fno(), cl.Dirichlet(lambda a: a[:, :, 0, :], dim=0, side="low"))
    with pytest.warns(UserWarning, match="callable values, which are code, not data"):
        lam.save_checkpoint(tmp_path, "lam")
    with pytest.raises(ValueError, match=r"expected the constraints.*Dirichlet\(<lambda>"):
        from_checkpoint(tmp_path, "lam")
    xin = torch.randn(2, 1, *GRID)
    again = from_checkpoint(
        tmp_path, "lam", cl.Dirichlet(lambda a: a[:, :, 0, :], dim=0, side="low")
    )
    assert torch.equal(again(xin), lam(xin))

    # a plain neuraloperator checkpoint has no sidecar: constraints needed, then it works
    make_fno().save_checkpoint(tmp_path, "plain")
    with pytest.raises(ValueError, match="plain neuraloperator checkpoint"):
        from_checkpoint(tmp_path, "plain")
    with quiet():
        assert repr(list(from_checkpoint(tmp_path, "plain", *walls()).bcs)) == repr(walls())
    with pytest.raises(FileNotFoundError, match="expected a checkpoint named 'nothing'"):
        from_checkpoint(tmp_path, "nothing")


def test_checkpoint_keeps_options_refinement_and_conservation(tmp_path: Path):
    x = torch.randn(2, 1, 24)
    torch.manual_seed(0)
    fno1d = FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8)
    refine = cl.wrap(fno1d, cl.Neumann(0.5, side="high", order=3), mode="refine", lift=3,
                     rcond=0.05, extent=2.0)  # fmt: skip
    refine.save_checkpoint(tmp_path, "refine")
    again = from_checkpoint(tmp_path, "refine")
    assert (again.mode, again.lift, again.rcond, again.extent) == ("refine", 3, 0.05, 2.0)
    assert len(again.refinements) == len(refine.refinements) > 0
    with torch.no_grad():
        assert torch.equal(again(x), refine(x))

    conserve = cl.wrap(FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8),
                       cl.Conservation.integral(1.5))  # fmt: skip
    conserve.save_checkpoint(tmp_path, "mass")
    back = from_checkpoint(tmp_path, "mass")
    assert type(back) is type(conserve)
    with torch.no_grad():
        torch.testing.assert_close(back(x), conserve(x), rtol=0, atol=0)


# ------------------------------------------------ items 2-4 (the layer's part; lead's issue 10)
def test_normalizer_is_held_not_owned():
    x, y = make_data()
    processor = make_processor(x, y)
    fno = make_fno()
    wrapped = cl.wrap(fno, *walls(), normalizer=processor)
    # the state dict is the model's under `model.`, nothing of the shared processor
    assert all(k.startswith("model.") for k in wrapped.state_dict())
    assert len(list(wrapped.parameters())) == len(list(fno.parameters()))
    # a plain FNO state dict loads strictly into the wrapper
    wrapped.load_state_dict(make_fno(3).state_dict(), strict=True)
    # loading a wrapper checkpoint leaves another wrapper's processor alone
    other = make_processor(2 * x + 5, 3 * y + 1)
    mean, std = other.out_normalizer.mean.clone(), other.out_normalizer.std.clone()
    twin = cl.wrap(make_fno(4), *walls(), normalizer=other)
    twin.load_state_dict(wrapped.state_dict(), strict=True)
    assert torch.equal(other.out_normalizer.mean, mean)
    assert torch.equal(other.out_normalizer.std, std)
    assert_walls_hold(physical(other, twin, x), float((3 * y + 1).abs().max()))


def test_data_processor_wrap_makes_no_reference_cycle():
    x, y = make_data()
    processor = make_processor(x, y)
    fno = make_fno()
    wrapped = cl.wrap(fno, *walls(), normalizer=processor)
    processor.wrap(wrapped)  # neuraloperator's own idiom
    wrapped.train()
    wrapped.eval()
    assert all(k.startswith("model.") for k in wrapped.state_dict())
    assert wrapped.to("cpu") is wrapped
    processor.train()
    processor.eval()
    processor.state_dict()
    repr(wrapped)
    assert len(list(wrapped.parameters())) == len(list(fno.parameters()))
    assert_walls_hold(physical(processor, wrapped, x), float(y.abs().max()))


@pytest.mark.parametrize("condition", [cl.Dirichlet(0.0), cl.Neumann(0.0), cl.Periodic()],
                         ids=repr)  # fmt: skip
def test_condition_without_dim_on_a_2d_output_asks_for_dim(condition):
    with pytest.raises(ValueError, match="dim="):
        cl.wrap(make_fno(), condition)(torch.randn(2, 1, *GRID))


def test_condition_without_dim_on_a_1d_output_and_explicit_dims_on_2d():
    torch.manual_seed(0)
    fno1d = FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8)
    u = cl.wrap(fno1d, cl.Dirichlet(0.0))(torch.randn(2, 1, 16))  # one axis: unambiguous
    assert (u[..., 0] == 0).all() and (u[..., -1] == 0).all()
    u = cl.wrap(make_fno(), *walls())(torch.randn(2, 1, *GRID))
    assert (boundary(u) == 0).all()  # all four faces, as written


def test_uqno_wrapper_checkpoint_round_trip(tmp_path: Path):
    from neuralop.models import UQNO

    torch.manual_seed(0)
    base = FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8)
    wrapped = cl.wrap(UQNO(base), cl.Conservation.integral(0.0))
    with quiet():
        wrapped.save_checkpoint(tmp_path, "uqno")
        again = from_checkpoint(tmp_path, "uqno")
    assert type(again.adapter) is type(wrapped.adapter)
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        for a, b in zip(again(x), wrapped(x)):
            assert torch.equal(a, b)


# ------------------------------------------------------------- issue 19: a forgotten normalizer=
def test_trainer_refuses_a_wrapper_without_normalizer_when_outputs_are_normalised():
    """With an out_normalizer in the Trainer's data processor, a wrapper without normalizer=
    would hold its walls in normalised units (on the training mean in physical units)."""
    x, y = make_data()
    processor = make_processor(x, y)
    model = cl.wrap(make_fno(), *walls())
    with pytest.raises(ValueError, match=r"BoundaryCorrection: called by neuraloperator's Trainer"
                       r".*out_normalizer.*normalizer=data_processor"):  # fmt: skip
        train(model, processor, make_loader(x, y), n_epochs=1)

    # deliberately in normalised units: said so, and the Trainer runs
    from constraint_layers.adapters.neuralop import NormalisedUnits

    model = cl.wrap(make_fno(), *walls(), normalizer=NormalisedUnits())
    train(model, processor, make_loader(x, y), n_epochs=1)
    xn = processor.in_normalizer.transform(x)
    with torch.no_grad():
        assert (boundary(model(xn)) == 0).all()  # the walls hold in the model's units

    # a processor without an output normaliser: nothing to convert, nothing to refuse
    plain = DefaultDataProcessor(in_normalizer=processor.in_normalizer, out_normalizer=None)
    train(cl.wrap(make_fno(), *walls()), plain, make_loader(x, y), n_epochs=1)
    # outside the Trainer the wrapper is called as it is
    cl.wrap(make_fno(), *walls())(xn)
