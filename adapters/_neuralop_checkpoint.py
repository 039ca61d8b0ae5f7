"""Checkpoints of wrapped neuraloperator models: ``save_checkpoint``, ``load_checkpoint``,
``from_checkpoint`` (private module; the public names live in
:mod:`constraint_layers.adapters.neuralop`).

Files, in ``save_folder`` for ``save_name``:

- ``{name}_state_dict.pt``: the model's state dict, pure tensors (``weights_only=True`` reads
  it). A refine checkpoint adds one tensor under :data:`REFINE_KEY`: its weights were trained
  inside the refinement and are another model without it, so neuraloperator's plain
  ``FNO.from_checkpoint`` / ``load_checkpoint`` (strict ``load_state_dict``) refuse the file,
  naming that key.
- ``{name}_metadata.pkl``: the model's init kwargs, as neuraloperator writes them (a pickle:
  neuraloperator's format, which its ``from_checkpoint`` needs). We read it with
  ``weights_only=True`` and an allowlist (``_sidecar.load_pickled``), never as a full pickle
  unless the caller passes ``trust_pickled_metadata=True``.
- ``{name}_constraint_layers.json``: the sidecar, a versioned JSON record of the wrapper (layer,
  constraints, options, adapter) and the fingerprint of the weights it belongs to; its tensors
  (tensor values, ``G`` matrices) in ``{name}_constraint_layers_tensors.pt`` (a dict of tensors).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from constraint_layers.errors import CheckpointError

from . import _sidecar

__all__ = [
    "LEGACY_SIDECAR_SUFFIX",
    "REFINE_KEY",
    "SIDECAR_SUFFIX",
    "TENSORS_SUFFIX",
    "from_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

#: File name suffix of the sidecar that describes a wrapper: ``{name}_constraint_layers.json``.
SIDECAR_SUFFIX = "_constraint_layers.json"
#: The sidecar's tensors: ``{name}_constraint_layers_tensors.pt`` (a dict of tensors).
TENSORS_SUFFIX = "_constraint_layers_tensors.pt"
#: The pickled sidecar of constraint-layers 0.1 (read only with ``trust_pickled_sidecar=True``).
LEGACY_SIDECAR_SUFFIX = "_constraint_layers.pt"
#: The state-dict entry that marks the weights of a refine checkpoint. Its name is what a strict
#: ``load_state_dict`` of the plain model reports as an unexpected key.
REFINE_KEY = "trained_with_constraint_layers_refine.load_with.constraint_layers_from_checkpoint"
_UNSET: Any = object()  # `normalizer=` not given (None means: no normaliser)
#: Init arguments of a layer that are not options: the model has its own files, the normaliser
#: belongs to the training pipeline, and the adapter is saved on its own.
_NOT_OPTIONS = ("self", "model", "adapter", "normalizer")


# ---------------------------------------------------------------------------------- saving
def _plain_model(wrapper: nn.Module) -> nn.Module:
    """The wrapped neuraloperator model itself: through ``torch.compile``'s ``OptimizedModule``
    (whose state-dict keys carry ``_orig_mod.``), so the files stay a plain model's."""
    model = wrapper.model
    return getattr(model, "_orig_mod", model)


def _describe(wrapper: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The sidecar record of a wrapper (layer, constraints, options, adapter) and its tensors.

    A layer's init arguments are read back from the attributes of the same name (the layers
    store each one under its own name); the first argument after the model holds the
    constraints. What cannot be stored as data is recorded as ``reason``; callables (lambda
    values) under ``callables``.
    """
    layer = type(wrapper)
    params = [
        p
        for p in inspect.signature(layer.__init__).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = [p.name for p in params if p.name not in _NOT_OPTIONS]
    values = {n: getattr(wrapper, n, _UNSET) for n in names}
    missing = [n for n, v in values.items() if v is _UNSET]
    constraints = values.pop(names[0]) if names else _UNSET
    normalizer = getattr(wrapper, "normalizer", None)
    tensors: dict[str, torch.Tensor] = {}
    record: dict[str, Any] = {
        "format": _sidecar.FORMAT,
        "version": _sidecar.VERSION,
        "layer": _sidecar._class_path(layer),
        "model": _sidecar._class_path(type(_plain_model(wrapper))),
        "mode": getattr(wrapper, "mode", "output"),
        "adapter": None,
        "normalizer": None if normalizer is None else type(normalizer).__name__,
        "constraints": None,
        "options": None,
        "callables": [],
        "description": f"{layer.__name__}({wrapper.extra_repr()})",
        "reason": None,
        "weights": None,
        "tensors": None,
    }
    try:  # an adapter of constraint-layers is data; any other is found again by the registry
        record["adapter"] = _sidecar.encode(wrapper.adapter, tensors, [], "adapter")
    except _sidecar.NotData:
        pass
    if missing or constraints is _UNSET:
        record["reason"] = (
            f"{layer.__name__} keeps no attribute for its init argument(s) {missing}, so the "
            "wrapper cannot be described"
        )
        return record, tensors
    try:
        record["options"] = {
            k: _sidecar.encode(v, tensors, [], f"option {k}=") for k, v in values.items()
        }
        callables: list[str] = []
        record["constraints"] = [
            _sidecar.encode(c, tensors, callables, repr(c)) for c in constraints
        ]
    except _sidecar.NotData as e:
        record["options"] = record["constraints"] = None
        record["reason"] = f"{e.what}"
        return record, tensors
    if callables:
        record["callables"] = [repr(c) for c in constraints if _has_callable(c)]
        record["constraints"] = None
        record["reason"] = (
            f"the constraints {record['callables']} hold callable values, which are code, not "
            "data (a sidecar stores no code)"
        )
    return record, tensors


def _has_callable(constraint: Any) -> bool:
    from constraint_layers._values import Given

    return any(
        callable(v) and not isinstance(v, (Given, type, torch.Tensor))
        for v in vars(constraint).values()
    )


def _write_json(path: Path, record: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, allow_nan=False), encoding="utf-8")
    os.replace(tmp, path)


def save_checkpoint(wrapper: nn.Module, save_folder: str | Path, save_name: str) -> None:
    """Save a wrapped neuraloperator model: the model's own checkpoint plus the wrapper's sidecar.

    Called as ``wrapped.save_checkpoint(save_folder, save_name)`` (neuraloperator's ``Trainer``
    does so with ``save_every`` / ``save_best``). Writes, in ``save_folder`` (created if needed):

    - ``{save_name}_state_dict.pt``: the model's state dict (pure tensors, without
      neuraloperator's ``_metadata`` entry, so ``torch.load(..., weights_only=True)`` reads it);
      with ``mode="refine"`` it also holds the tensor :data:`REFINE_KEY`, so that the plain
      model's strict loading refuses weights that were trained inside the refinement;
    - ``{save_name}_metadata.pkl``: the model's init kwargs, as neuraloperator writes them;
    - ``{save_name}_constraint_layers.json`` (and ``..._tensors.pt`` when the constraints hold
      tensors): the wrapper's layer class, constraints and options as data, and the
      fingerprint of the weights.

    In output mode the first two are a plain neuraloperator checkpoint:
    ``FNO.from_checkpoint(save_folder, save_name)`` loads the bare model. The normaliser is not
    saved (it is the training pipeline's); constraints with callable values (lambdas) are
    code, not data: they are left out with a warning and passed again at load.

    Parameters
    ----------
    wrapper : nn.Module
        A constraint layer around a neuraloperator model.
    save_folder : str or Path
        The folder to write to.
    save_name : str
        The prefix of the file names.
    """
    from .neuralop import _drop_metadata_entries

    model = _plain_model(wrapper)
    folder = Path(save_folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    _drop_metadata_entries(model, state)
    weights = folder / f"{save_name}_state_dict.pt"
    record, tensors = _describe(wrapper)
    record["weights"] = {"file": weights.name, "fingerprint": _sidecar.fingerprint(state)}
    if record["mode"] == "refine":
        state[REFINE_KEY] = torch.ones(())
    torch.save(state, weights)
    torch.save(model._init_kwargs, folder / f"{save_name}_metadata.pkl")
    table = folder / f"{save_name}{TENSORS_SUFFIX}"
    if tensors:
        torch.save(tensors, table)
        record["tensors"] = {"file": table.name, "sha256": _sidecar.sha256_file(table)}
    elif table.exists():
        table.unlink()  # a previous save's: it would not match this record
    legacy = folder / f"{save_name}{LEGACY_SIDECAR_SUFFIX}"
    if legacy.exists():
        legacy.unlink()  # the pickled sidecar of constraint-layers 0.1 under this name
    _write_json(folder / f"{save_name}{SIDECAR_SUFFIX}", record)
    if record["reason"] is not None:
        warnings.warn(
            f"save_checkpoint: saved the model's weights, but not the wrapper: {record['reason']}. "
            f"To reload, pass the constraints again: constraint_layers.adapters.neuralop."
            f"from_checkpoint(folder, {save_name!r}, *constraints, ...). Saved wrapper: "
            f"{record['description']}.",
            UserWarning,
            stacklevel=2,
        )


# --------------------------------------------------------------------------------- loading
def _read_state(
    path: Path, call: str, map_location: Any, trusted: bool
) -> tuple[dict[str, Any], bool]:
    """A state-dict file (ours: pure tensors; neuraloperator's: with ``_metadata``), read without
    unpickling code; returns it without the refine marker, and whether the marker was there."""
    state = _sidecar.load_pickled(path, call, map_location, trusted, "trust_pickled_metadata")
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{call}: {path.name} holds a {type(state).__name__}, not a state dict."
        )
    refined = state.pop(REFINE_KEY, None) is not None
    return state, refined


def load_checkpoint(
    wrapper: nn.Module,
    save_folder: str | Path,
    save_name: str,
    map_location: Any = None,
    *,
    trust_pickled_metadata: bool = False,
) -> None:
    """Load the model weights of a checkpoint into the wrapped model, in place.

    Called as ``wrapped.load_checkpoint(save_folder, save_name)``. Reads
    ``{save_name}_state_dict.pt`` (written by the wrapper's ``save_checkpoint`` or by the plain
    model's) without unpickling code; the wrapper keeps its own constraints and options (to
    rebuild those from the checkpoint, use :func:`from_checkpoint`). Weights of a refine
    checkpoint loaded into a wrapper in output mode give a warning (another model).

    Parameters
    ----------
    wrapper : nn.Module
        A constraint layer around a neuraloperator model.
    save_folder : str or Path
        The folder holding the checkpoint.
    save_name : str
        The prefix of its file names.
    map_location : optional
        As for ``torch.load``.
    trust_pickled_metadata : bool, default False
        Read a plain neuraloperator state dict (whose ``_metadata`` entry names classes and
        functions) as a full pickle; by default it is read with ``weights_only=True`` and the
        allowlist of :func:`from_checkpoint`.

    Raises
    ------
    FileNotFoundError
        No ``{save_name}_state_dict.pt`` in ``save_folder``.
    CheckpointError
        The file names objects outside the allowlist, or is not a state dict.
    """
    call = "load_checkpoint"
    path = Path(save_folder) / f"{save_name}_state_dict.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{call}: no file {path.name} in {str(save_folder)!r}.")
    state, refined = _read_state(path, call, map_location, trust_pickled_metadata)
    if refined and getattr(wrapper, "mode", "output") != "refine":
        warnings.warn(
            f"{call}: {path.name} holds weights trained with mode='refine'; this wrapper is in "
            f"mode={wrapper.mode!r}, so it computes another model with them. Wrap the model with "
            "mode='refine' (or rebuild it with from_checkpoint).",
            UserWarning,
            stacklevel=2,
        )
    _plain_model(wrapper).load_state_dict(state)


def _legacy_record(path: Path, call: str, trusted: bool) -> dict[str, Any]:
    if not trusted:
        raise CheckpointError(
            f"{call}: {path.name} is a pickled sidecar (written by constraint-layers 0.1). "
            "Loading a pickle runs whatever code it holds, so it is not read by default. If you "
            "trust the file (you wrote it), pass trust_pickled_sidecar=True, then save the "
            "wrapper again to get the data format; otherwise pass the constraints yourself: "
            "from_checkpoint(folder, name, *constraints)."
        )
    try:
        old = torch.load(path, weights_only=False)
        return {
            "layer": old["layer"],
            "model": old["model"],
            "mode": (old["options"] or {}).get("mode", "output"),
            "adapter_object": old.get("adapter"),
            "normalizer": old["normalizer"],
            "constraints_objects": old["constraints"],
            "options_objects": old["options"],
            "callables": [],
            "description": old["description"],
            "reason": old["reason"],
            "weights": None,
        }
    except Exception as e:  # a trusted but damaged file
        raise CheckpointError(f"{call}: cannot read the pickled sidecar {path.name}: {e!r}.") from e


def _model_class(record: dict[str, Any] | None, kwargs: dict, metadata: Path, call: str) -> type:
    from neuralop.models.base_model import BaseModel

    cls = None
    if record is not None and isinstance(record.get("model"), str):
        module, _, qualname = record["model"].partition(":")
        obj: Any = sys.modules.get(module)
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        cls = obj if isinstance(obj, type) and issubclass(obj, BaseModel) else None
    if cls is None:
        cls = BaseModel._models.get(str(kwargs.get("_name", "")).lower())
    if cls is None:
        raise CheckpointError(
            f"{call}: cannot tell the model class of {metadata.name} (neuraloperator name "
            f"{kwargs.get('_name')!r}); load it with YourModel.from_checkpoint and wrap it."
        )
    return cls


def _build_model(cls: type, kwargs: dict, metadata: Path, call: str) -> nn.Module:
    """What neuraloperator's ``BaseModel.from_checkpoint`` does with the init kwargs."""
    kwargs = dict(kwargs)
    version = kwargs.pop("_version", None)
    if hasattr(cls, "_version") and version != cls._version:
        warnings.warn(
            f"{call}: {metadata.name} was saved for version {version} of {cls.__name__}; the "
            f"installed neuraloperator has version {cls._version}.",
            UserWarning,
            stacklevel=3,
        )
    kwargs.pop("_name", None)
    args = kwargs.pop("args", ())
    return cls(*args, **kwargs)


def _layer_class(path: Any) -> type | None:
    from constraint_layers.layer import ConstraintLayer

    if not isinstance(path, str):
        return None
    module, _, qualname = path.partition(":")
    if not module.startswith("constraint_layers."):
        return None
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and issubclass(obj, ConstraintLayer) else None


def _decoded(record: dict, key: str, tensors: dict, sidecar: Path, call: str) -> Any:
    if f"{key}_objects" in record:  # a trusted legacy pickle
        return record[f"{key}_objects"]
    try:
        if key == "options":  # a JSON object of option name -> encoded value
            return {str(k): _sidecar.decode(v, tensors, k) for k, v in record[key].items()}
        return _sidecar.decode(record[key], tensors, key)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{call}: {sidecar.name} has a damaged {key!r} entry ({e}); the file is damaged or "
            "not the one save_checkpoint wrote."
        ) from None


def from_checkpoint(
    save_folder: str | Path,
    save_name: str,
    *constraints: Any,
    normalizer: object = _UNSET,
    map_location: Any = None,
    trust_pickled_sidecar: bool = False,
    trust_pickled_metadata: bool = False,
    **options: Any,
) -> nn.Module:
    """Rebuild a wrapped neuraloperator model from a checkpoint its ``save_checkpoint`` wrote.

    The model is rebuilt from its init kwargs (``{save_name}_metadata.pkl``) and weights
    (``{save_name}_state_dict.pt``) as neuraloperator's ``from_checkpoint`` does, but without
    unpickling code; the wrapper from the sidecar ``{save_name}_constraint_layers.json`` (same
    layer class, constraints, options and adapter), which must belong to these weights.

    Parameters
    ----------
    save_folder : str or Path
        The folder holding the checkpoint.
    save_name : str
        The prefix of its file names (the ``Trainer`` uses ``"model"`` or ``"best_model"``).
    *constraints
        Constraints to use instead of the saved ones (the saved layer and options are kept);
        required when the sidecar holds none (callable values, or a plain neuraloperator
        checkpoint).
    normalizer : object, optional
        The training pipeline's output normaliser (e.g. the ``DefaultDataProcessor``). Required
        when the wrapper was saved with one (pass ``None`` to drop it deliberately).
    map_location : optional
        As for ``torch.load``.
    trust_pickled_sidecar : bool, default False
        Read a pickled sidecar of constraint-layers 0.1 (``{save_name}_constraint_layers.pt``)
        as a pickle, which runs any code it holds: only for files you trust.
    trust_pickled_metadata : bool, default False
        Read neuraloperator's pickled files as full pickles. By default they are read with
        ``weights_only=True``, allowing only model classes and functions of neuraloperator and
        ``torch.nn`` (what neuraloperator writes there).
    **options
        Layer options that replace the saved ones (e.g. ``debug=True``).

    Returns
    -------
    nn.Module
        The rebuilt wrapper; ``wrapper.model`` is the model with the checkpoint's weights.

    Raises
    ------
    FileNotFoundError
        The folder holds no model checkpoint named ``save_name``.
    CheckpointError
        The sidecar is damaged, belongs to other weights, or is a pickle not trusted; a
        pickled file names objects that are not loaded without ``trust_pickled_...=True``.
    ValueError
        The constraints or the normaliser are needed and were not given.

    Examples
    --------
    >>> import tempfile, torch, constraint_layers as cl
    >>> from neuralop.models import FNO
    >>> from constraint_layers.adapters.neuralop import from_checkpoint
    >>> fno = FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=4)
    >>> wrapped = cl.wrap(fno, cl.Dirichlet(0.0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     wrapped.save_checkpoint(folder, "fno")
    ...     again = from_checkpoint(folder, "fno")
    >>> list(again.bcs)
    [Dirichlet(0.0, side='both')]
    >>> x = torch.randn(2, 1, 16)
    >>> torch.equal(again(x), wrapped(x))
    True
    """
    call = "from_checkpoint"
    folder = Path(save_folder)
    weights = folder / f"{save_name}_state_dict.pt"
    metadata = folder / f"{save_name}_metadata.pkl"
    if not (weights.exists() and metadata.exists()):
        raise FileNotFoundError(
            f"{call}: expected a checkpoint named {save_name!r} in {str(folder)!r} (files "
            f"{weights.name} and {metadata.name}, as save_checkpoint writes them); found "
            f"{sorted(p.name for p in folder.glob('*'))[:8] if folder.is_dir() else 'no folder'}."
        )
    sidecar = folder / f"{save_name}{SIDECAR_SUFFIX}"
    legacy = folder / f"{save_name}{LEGACY_SIDECAR_SUFFIX}"
    record: dict[str, Any] | None = None
    tensors: dict[str, torch.Tensor] = {}
    if sidecar.exists():
        if legacy.exists():  # save_checkpoint removes it: this one was put there afterwards
            raise CheckpointError(
                f"{call}: {legacy.name}, a pickled sidecar, lies next to {sidecar.name}, which "
                "save_checkpoint writes after removing the pickle: it was not written with "
                "this checkpoint, and is not read (loading a pickle runs the code it holds). "
                f"Delete {legacy.name}."
            )
        record = _sidecar.read_record(sidecar, call)
    elif legacy.exists():
        sidecar = legacy
        record = _legacy_record(legacy, call, trust_pickled_sidecar)

    kwargs = _sidecar.load_pickled(
        metadata, call, None, trust_pickled_metadata, "trust_pickled_metadata"
    )
    if not isinstance(kwargs, dict):
        raise CheckpointError(
            f"{call}: {metadata.name} holds a {type(kwargs).__name__}, not the model's init kwargs."
        )
    model_cls = _model_class(record, kwargs, metadata, call)
    state, refined = _read_state(weights, call, map_location, trust_pickled_metadata)
    if record is not None and record.get("weights") is not None:
        saved = (
            record["weights"].get("fingerprint") if isinstance(record["weights"], dict) else None
        )
        if saved != _sidecar.fingerprint(state):
            raise CheckpointError(
                f"{call}: {sidecar.name} does not belong to {weights.name}: it was saved with "
                "other weights (a sidecar copied from another checkpoint, or weights saved again "
                "without the wrapper). Its constraints may not be the ones these weights were "
                f"trained with ({record['description']}). Save the wrapper again, or delete "
                f"{sidecar.name} and pass the constraints: from_checkpoint(folder, "
                f"{save_name!r}, *constraints)."
            )
    if record is not None and "tensors" in record:  # after the fingerprint: a copied sidecar
        tensors = _sidecar.read_tensors(folder, record["tensors"], sidecar, call, map_location)

    if not constraints:
        if record is None or (
            record.get("constraints") is None and not record.get("constraints_objects")
        ):
            why = (
                f"{sidecar.name} is missing (a plain neuraloperator checkpoint?)"
                if record is None
                else f"the checkpoint holds no constraints: {record['reason']} (saved wrapper: "
                f"{record['description']})"
            )
            raise ValueError(
                f"{call}: expected the constraints, as the checkpoint cannot supply them: {why}. "
                f"Pass them (and any layer options): from_checkpoint(folder, {save_name!r}, "
                f"cl.Dirichlet(...), ...), or "
                f"wrap the model yourself: cl.wrap({model_cls.__name__}.from_checkpoint(folder, "
                f"{save_name!r}), *constraints)."
            )
        constraints = tuple(_decoded(record, "constraints", tensors, sidecar, call))
    saved_options: dict[str, Any] = {}
    if record is not None and (record.get("options") or record.get("options_objects")):
        saved_options = dict(_decoded(record, "options", tensors, sidecar, call))
    if normalizer is _UNSET:
        if record is not None and record["normalizer"] is not None:
            raise ValueError(
                f"{call}: the wrapper was saved with normalizer= a {record['normalizer']}, which "
                "is the training pipeline's and not part of the checkpoint. Pass it again: "
                f"from_checkpoint(folder, {save_name!r}, normalizer=data_processor) (or "
                "normalizer=None to drop it; the outputs are then in normalised units)."
            )
        normalizer = None
    opts = {**saved_options, **options, "normalizer": normalizer}
    if refined and opts.get("mode", "output") != "refine":
        warnings.warn(
            f"{call}: {weights.name} holds weights trained with mode='refine', and the wrapper "
            f"is built with mode={opts.get('mode', 'output')!r}: another model. Pass "
            "mode='refine' to rebuild the model that was trained.",
            UserWarning,
            stacklevel=2,
        )
    if record is not None and "adapter" not in options:
        adapter = (
            record["adapter_object"]
            if "adapter_object" in record
            else (
                _decoded(record, "adapter", tensors, sidecar, call)
                if record.get("adapter") is not None
                else None
            )
        )
        if adapter is not None:
            opts["adapter"] = adapter
    model = _build_model(model_cls, kwargs, metadata, call)
    model.load_state_dict(state)
    layer = _layer_class(record["layer"]) if record is not None else None
    if layer is not None:
        return layer(model, list(constraints), **opts)
    from .wrap import wrap

    return wrap(model, *constraints, **opts)


WRAPPER_METHODS = {"save_checkpoint": save_checkpoint, "load_checkpoint": load_checkpoint}
