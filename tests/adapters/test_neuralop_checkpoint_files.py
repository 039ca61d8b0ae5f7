"""Checkpoint files of a wrapped neuraloperator model (issue 19): the sidecar is data, carries the
fingerprint of its weights, and nothing we read runs code from a file."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import constraint_layers as cl
from constraint_layers.errors import CheckpointError

pytest.importorskip("neuralop")

from neuralop.models import FNO

from constraint_layers.adapters.neuralop import (
    LEGACY_SIDECAR_SUFFIX,
    REFINE_KEY,
    SIDECAR_SUFFIX,
    TENSORS_SUFFIX,
    from_checkpoint,
)


def fno1d(seed: int = 0) -> FNO:
    torch.manual_seed(seed)
    return FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8)


class Payload:
    """Pickles as a call to ``os.system`` that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _save(folder: Path, name: str, *constraints, seed: int = 0, **options) -> torch.nn.Module:
    wrapped = cl.wrap(fno1d(seed), *constraints, **options)
    wrapped.save_checkpoint(folder, name)
    return wrapped


# ------------------------------------------------------------------------------ data, not pickles
def test_sidecar_is_json_and_tensors_load_weights_only(tmp_path: Path):
    g = torch.linspace(0, 1, 24, dtype=torch.float64) ** 2
    constraints = [
        cl.Neumann(torch.tensor([0.5]), side="high", order=3),
        cl.Dirichlet(cl.Given("left"), side="low"),
        cl.Conservation.integral(1.5, rule="simpson", grid=g),
        cl.Bounds(lower=-3.0, upper=torch.full((24,), 4.0)),
    ]
    # (no extent=: the integral states its own nodes, and the wrapper grid must not contradict it)
    wrapped = _save(tmp_path, "m", *constraints, lift=2, noise=0.0)
    record = json.loads((tmp_path / f"m{SIDECAR_SUFFIX}").read_text())
    assert record["format"] == "constraint-layers sidecar" and record["version"] == 2
    assert (
        record["weights"]["file"] == "m_state_dict.pt"
        and len(record["weights"]["fingerprint"]) == 64
    )
    table = torch.load(tmp_path / f"m{TENSORS_SUFFIX}", weights_only=True)
    assert all(isinstance(t, torch.Tensor) for t in table.values()) and len(table) == 3
    torch.load(tmp_path / "m_state_dict.pt", weights_only=True)  # pure tensors
    assert not (tmp_path / f"m{LEGACY_SIDECAR_SUFFIX}").exists()

    again = from_checkpoint(tmp_path, "m")
    assert repr(again.constraints) == repr(wrapped.constraints)
    assert again.extra_repr() == wrapped.extra_repr()
    x, left = torch.randn(3, 1, 24), torch.randn(3, 1)
    with torch.no_grad():
        assert torch.equal(again(x, left=left), wrapped(x, left=left))


def test_learnable_value_and_dtype_round_trip(tmp_path: Path):
    p = torch.nn.Parameter(torch.tensor(0.25, dtype=torch.float64))
    _save(tmp_path, "p", cl.Dirichlet(p))
    (bc,) = from_checkpoint(tmp_path, "p").bcs
    assert isinstance(bc.value, torch.nn.Parameter) and bc.value.dtype == torch.float64
    assert float(bc.value.detach()) == 0.25


@pytest.mark.parametrize("where", ["sidecar", "tensors", "legacy", "beside", "metadata", "weights"])
def test_a_pickle_with_a_payload_is_never_run(tmp_path: Path, where: str):
    marker = tmp_path / "pwned"
    _save(tmp_path, "m", cl.Dirichlet(torch.tensor([0.0])))
    target = {
        "sidecar": tmp_path / f"m{SIDECAR_SUFFIX}",
        "tensors": tmp_path / f"m{TENSORS_SUFFIX}",
        "legacy": tmp_path / f"m{LEGACY_SIDECAR_SUFFIX}",
        "beside": tmp_path / f"m{LEGACY_SIDECAR_SUFFIX}",  # next to the JSON sidecar
        "metadata": tmp_path / "m_metadata.pkl",
        "weights": tmp_path / "m_state_dict.pt",
    }[where]
    if where == "legacy":  # an old pickled sidecar, and no new one
        (tmp_path / f"m{SIDECAR_SUFFIX}").unlink()
    torch.save({"format": 1, "constraints": [Payload(marker)]}, target)
    flag = (
        "trust_pickled_sidecar" if where == "legacy" else r"(SHA-256|trust_pickled_metadata|JSON)"
    )
    if where == "beside":
        flag = rf"next to m{SIDECAR_SUFFIX}.*is not read"
    with pytest.raises(CheckpointError, match=rf"{target.name}.*{flag}"):
        from_checkpoint(tmp_path, "m")
    assert not marker.exists()
    if where == "weights":
        with pytest.raises(CheckpointError, match="trust_pickled_metadata"):
            cl.wrap(fno1d(), cl.Dirichlet(0.0)).load_checkpoint(tmp_path, "m")
        assert not marker.exists()


def test_trusted_legacy_sidecar_loads_with_the_explicit_opt_in(tmp_path: Path):
    wrapped = _save(tmp_path, "old", cl.Neumann(0.5, side="high"), lift=2)
    (tmp_path / f"old{SIDECAR_SUFFIX}").unlink()
    torch.save(
        {"format": 1, "layer": "constraint_layers.layer:BoundaryCorrection",
         "model": "neuralop.models.fno:FNO", "adapter": None, "normalizer": None,
         "constraints": [cl.Neumann(0.5, side="high")], "options": {"lift": 2},
         "description": "BoundaryCorrection(...)", "reason": None},
        tmp_path / f"old{LEGACY_SIDECAR_SUFFIX}",
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="pickled sidecar.*trust_pickled_sidecar=True"):
        from_checkpoint(tmp_path, "old")
    again = from_checkpoint(tmp_path, "old", trust_pickled_sidecar=True)
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        assert torch.equal(again(x), wrapped(x))


@pytest.mark.parametrize("kind", ["UQNO", "TFNO", "FNO-CP"])
def test_plain_checkpoints_of_other_models_load_with_the_allowlist(tmp_path: Path, kind: str):
    """neuraloperator's own files name layer classes, activations, a whole base model (UQNO)
    and factorised tensors (tensorly-torch): all on the allowlist, no trust flag needed."""
    from neuralop.models import TFNO, UQNO

    torch.manual_seed(0)
    model = {
        "UQNO": lambda: UQNO(fno1d()),
        "TFNO": lambda: TFNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=8),
        "FNO-CP": lambda: FNO(
            n_modes=(4,),
            in_channels=1,
            out_channels=1,
            hidden_channels=8,
            factorization="cp",
            rank=0.5,
        ),
    }[kind]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_checkpoint(tmp_path, "p")
    wrapped = from_checkpoint(tmp_path, "p", cl.Conservation.integral(0.0))
    assert type(wrapped.model) is type(model)
    x = torch.randn(2, 1, 16)
    with torch.no_grad():
        a, b = wrapped.model(x), model(x)
    for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        assert torch.equal(u, v)


def test_a_plain_neuralop_checkpoint_loads_without_unpickling(tmp_path: Path):
    fno1d(3).save_checkpoint(tmp_path, "plain")  # _metadata (F.gelu, SpectralConv) inside
    wrapped = from_checkpoint(tmp_path, "plain", cl.Dirichlet(0.0))
    assert torch.equal(cl.unwrap(wrapped).fno_blocks.convs[0].weight.to_tensor(),
                       fno1d(3).fno_blocks.convs[0].weight.to_tensor())  # fmt: skip


# ------------------------------------------------------------------------------- fingerprints
def test_a_sidecar_copied_from_another_checkpoint_is_refused(tmp_path: Path):
    _save(tmp_path / "a", "model", cl.Neumann(0.0), seed=0)
    _save(tmp_path / "b", "model", cl.Dirichlet(0.0), seed=1)
    shutil.copy(tmp_path / "b" / f"model{SIDECAR_SUFFIX}", tmp_path / "a")
    with pytest.raises(
        CheckpointError, match=rf"model{SIDECAR_SUFFIX} does not belong to model_state_dict\.pt"
    ):
        from_checkpoint(tmp_path / "a", "model")
    # with tensors, copied with or without its tensor file: the weights file is named first
    _save(tmp_path / "d", "model", cl.Dirichlet(torch.tensor([1.0])), seed=2)
    shutil.copy(tmp_path / "d" / f"model{SIDECAR_SUFFIX}", tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not belong to model_state_dict"):
        from_checkpoint(tmp_path / "a", "model")
    shutil.copy(tmp_path / "d" / f"model{TENSORS_SUFFIX}", tmp_path / "a")
    with pytest.raises(CheckpointError, match="does not belong to model_state_dict"):
        from_checkpoint(tmp_path / "a", "model")
    # a new save over a folder holding a 0.1 pickle removes that pickle
    torch.save({"format": 1}, tmp_path / "a" / f"model{LEGACY_SIDECAR_SUFFIX}")
    _save(tmp_path / "a", "model", cl.Neumann(0.0))
    assert not (tmp_path / "a" / f"model{LEGACY_SIDECAR_SUFFIX}").exists()
    from_checkpoint(tmp_path / "a", "model")
    # weights saved again without the wrapper: same refusal
    _save(tmp_path / "c", "model", cl.Dirichlet(0.0), seed=0)
    fno1d(5).save_checkpoint(tmp_path / "c", "model")
    with pytest.raises(CheckpointError, match="does not belong to"):
        from_checkpoint(tmp_path / "c", "model")


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(64))
    elif how == "missing keys":
        record = json.loads(data)
        del record["weights"], record["constraints"]
        path.write_text(json.dumps(record))
    elif how == "bad entry":
        record = json.loads(data)
        record["constraints"] = [{"$object": "os:system", "state": {}}]
        path.write_text(json.dumps(record))
    elif how == "newer":
        record = json.loads(data)
        record["version"] = 99
        path.write_text(json.dumps(record))


@pytest.mark.parametrize(
    "how", ["empty", "truncated", "garbage", "missing keys", "bad entry", "newer"]
)
def test_a_damaged_sidecar_raises_one_error_naming_the_file(tmp_path: Path, how: str):
    _save(tmp_path, "m", cl.Dirichlet(torch.tensor([1.0])))
    _damage(tmp_path / f"m{SIDECAR_SUFFIX}", how)
    with pytest.raises(CheckpointError, match=rf"m{SIDECAR_SUFFIX}"):
        from_checkpoint(tmp_path, "m")


@pytest.mark.parametrize("how", ["missing", "empty", "garbage"])
def test_a_damaged_or_missing_tensor_file_names_it(tmp_path: Path, how: str):
    _save(tmp_path, "m", cl.Dirichlet(torch.tensor([1.0])))
    path = tmp_path / f"m{TENSORS_SUFFIX}"
    if how == "missing":
        path.unlink()
    else:
        _damage(path, how)
    with pytest.raises(CheckpointError, match=rf"m{TENSORS_SUFFIX}"):
        from_checkpoint(tmp_path, "m")


# --------------------------------------------------------------------------- refine checkpoints
def test_a_refine_checkpoint_does_not_pass_for_a_plain_model(tmp_path: Path):
    refine = _save(tmp_path, "r", cl.Dirichlet(0.0), mode="refine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=REFINE_KEY.split(".")[0]):
            FNO.from_checkpoint(tmp_path, "r")
        with pytest.raises(RuntimeError, match="trained_with_constraint_layers_refine"):
            fno1d().load_checkpoint(tmp_path, "r")
    # the wrapper itself reloads it (rebuilt, in place, or as the Trainer resumes)
    x = torch.randn(2, 1, 24)
    with torch.no_grad():
        expected = refine(x)
        assert torch.equal(from_checkpoint(tmp_path, "r")(x), expected)
        target = cl.wrap(fno1d(7), cl.Dirichlet(0.0), mode="refine")
        target.load_checkpoint(tmp_path, "r")
        assert torch.equal(target(x), expected)
        resumed = cl.wrap(fno1d(8), cl.Dirichlet(0.0), mode="refine")
        resumed.load_state_dict(torch.load(tmp_path / "r_state_dict.pt"))  # neuralop's resume
        assert torch.equal(resumed(x), expected)
    # into an output-mode wrapper: another model, said so
    with pytest.warns(UserWarning, match="trained with mode='refine'"):
        cl.wrap(fno1d(), cl.Dirichlet(0.0)).load_checkpoint(tmp_path, "r")
    with pytest.warns(UserWarning, match="trained with mode='refine'"):
        from_checkpoint(tmp_path, "r", mode="output")
    # the deliberate route to the bare model with these weights
    assert type(cl.unwrap(from_checkpoint(tmp_path, "r"))) is FNO


@pytest.mark.slow  # a new Python process importing torch and neuraloperator: about 10 s
def test_a_fresh_process_rebuilds_the_adapter_it_has_not_imported_yet(tmp_path: Path):
    """The sidecar names the UQNO adapter; a new process loads it before wrapping any UQNO."""
    import subprocess
    import sys

    from neuralop.models import UQNO

    torch.manual_seed(0)
    wrapped = cl.wrap(UQNO(fno1d()), cl.Conservation.integral(0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped.save_checkpoint(tmp_path, "u")
    torch.save(wrapped(torch.ones(2, 1, 16))[0].detach(), tmp_path / "expected.pt")
    script = (
        "import sys, warnings, torch; warnings.simplefilter('ignore');"
        "from constraint_layers.adapters.neuralop import from_checkpoint;"
        "assert 'constraint_layers.adapters.uqno' not in sys.modules;"
        f"w = from_checkpoint({str(tmp_path)!r}, 'u');"
        "assert type(w.adapter).__name__ == 'UQNOAdapter', w.adapter;"
        f"assert torch.equal(w(torch.ones(2, 1, 16))[0], torch.load({str(tmp_path / 'expected.pt')!r}))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow  # torch.compile: about 10 s on a loaded machine
def test_a_compiled_model_saves_a_plain_checkpoint(tmp_path: Path):
    """torch.compile's OptimizedModule prefixes its keys with `_orig_mod.`: the files hold the
    model's own (the adapter is named here; recognising a compiled model is the registry's)."""
    from constraint_layers.adapters.neuralop import NeuralopAdapter

    fno = fno1d()
    wrapped = cl.wrap(torch.compile(fno, backend="eager"), cl.Dirichlet(0.0),
                      adapter=NeuralopAdapter())  # fmt: skip
    x = torch.randn(2, 1, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = wrapped(x).detach()
        wrapped.save_checkpoint(tmp_path, "c")
        state = torch.load(tmp_path / "c_state_dict.pt", weights_only=True)
        assert set(state) == {k for k in fno.state_dict() if k != "_metadata"}
        again = from_checkpoint(tmp_path, "c")
        assert type(again.model) is FNO
        torch.testing.assert_close(again(x), expected, rtol=0, atol=0)
        wrapped.load_checkpoint(tmp_path, "c")  # in place, through the compiled module
