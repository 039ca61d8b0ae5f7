"""The checkpoint sidecar as data: a versioned JSON record plus a tensor file (private).

A wrapper's sidecar describes it (layer class, constraints, options, adapter) without pickling
any object: :func:`encode` turns the description into JSON-able values, storing tensors in a
separate table (written with ``torch.save`` as a plain dict of tensors, read back with
``torch.load(weights_only=True)``), and :func:`decode` rebuilds it. Objects are rebuilt only
when their class is a constraint, :class:`~constraint_layers.Given` or an adapter defined inside
constraint-layers (the class is looked up by name in an already imported module of this package:
nothing is imported or called on the file's say). A callable value (a lambda) is not data: it is
recorded by name, and the loader asks for the constraints again.

:func:`fingerprint` is the identity of a model checkpoint's weights (a SHA-256 over the tensors'
names, dtypes, shapes and bytes), which the sidecar carries so that a sidecar next to other
weights is refused. :func:`load_pickled` reads neuraloperator's own pickled files (its
``_metadata.pkl`` and a plain model's state dict, which hold the model's init kwargs) with
``weights_only=True`` and an allowlist of the globals such files need.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from constraint_layers._values import Given
from constraint_layers.errors import CheckpointError

__all__ = [
    "FORMAT",
    "VERSION",
    "NotData",
    "decode",
    "encode",
    "fingerprint",
    "load_pickled",
    "read_record",
    "read_tensors",
    "sha256_file",
]

#: The record's ``format`` field, and the newest version this code reads and writes.
FORMAT = "constraint-layers sidecar"
VERSION = 2
_PACKAGES = ("constraint_layers.",)


class NotData(Exception):
    """Raised by :func:`encode` for a value that is not data (internal)."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


# ---------------------------------------------------------------------------------- encoding
def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _rebuildable(cls: type) -> bool:
    """Classes whose instances the sidecar stores as their attributes: the constraints (a
    ``family`` class attribute), ``Given`` and the adapters of constraint-layers."""
    from constraint_layers.adapters.base import Adapter

    if not cls.__module__.startswith(_PACKAGES) or issubclass(cls, nn.Module):
        return False
    return cls is Given or isinstance(getattr(cls, "family", None), str) or issubclass(cls, Adapter)


def encode(obj: Any, tensors: dict[str, Tensor], callables: list[str], where: str) -> Any:
    """``obj`` as JSON-able values; tensors go to ``tensors`` (referenced by key); callables are
    recorded by name in ``callables`` (they cannot be saved). Raises :class:`NotData` for any
    other object."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, Tensor):
        if obj.is_meta:
            raise NotData(f"{where} is a meta tensor (no values)")
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone()
        return {"$tensor": key, "parameter": isinstance(obj, nn.Parameter),
                "requires_grad": bool(obj.requires_grad)}  # fmt: skip
    if isinstance(obj, list):
        return [encode(v, tensors, callables, where) for v in obj]
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, tensors, callables, where) for v in obj]}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise NotData(f"{where} is a dict with keys that are not strings")
        return {"$dict": {k: encode(v, tensors, callables, where) for k, v in obj.items()}}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    cls = type(obj)
    if _rebuildable(cls):
        if cls is Given:
            return {"$given": obj.name}
        state = {k: encode(v, tensors, callables, f"{where}.{k}") for k, v in vars(obj).items()}
        return {"$object": _class_path(cls), "state": state}
    if callable(obj) and not isinstance(obj, type):
        callables.append(getattr(obj, "__qualname__", None) or type(obj).__name__)
        return {"$callable": callables[-1]}
    raise NotData(f"{where} is a {cls.__name__}, which the sidecar cannot store as data")


def _find_class(path: str) -> type | None:
    """The class named ``module:qualname``, looked up only in modules of constraint-layers
    (imported if need be: our own modules; the file never makes us import anything else, and
    no class is called)."""
    module, _, qualname = path.partition(":")
    if not module.startswith(_PACKAGES):
        return None
    try:
        obj: Any = sys.modules.get(module) or importlib.import_module(module)
    except ImportError:
        return None
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) and _rebuildable(obj) else None


def decode(data: Any, tensors: dict[str, Tensor], where: str) -> Any:
    """The inverse of :func:`encode`. Raises :class:`KeyError` / :class:`TypeError` /
    :class:`ValueError` on a record it did not write (the caller reports the file)."""
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode(v, tensors, where) for v in data]
    if not isinstance(data, dict) or len(data) == 0:
        raise ValueError(f"unexpected entry {data!r} in {where}")
    if "$float" in data:
        return float(data["$float"])
    if "$tensor" in data:
        t = tensors[data["$tensor"]]
        if data.get("parameter"):
            return nn.Parameter(t, requires_grad=bool(data.get("requires_grad", True)))
        return t.requires_grad_(bool(data.get("requires_grad", False)))
    if "$tuple" in data:
        return tuple(decode(v, tensors, where) for v in data["$tuple"])
    if "$dict" in data:
        return {str(k): decode(v, tensors, where) for k, v in data["$dict"].items()}
    if "$dtype" in data:
        dtype = getattr(torch, str(data["$dtype"]), None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {data['$dtype']!r} in {where}")
        return dtype
    if "$given" in data:
        return Given(str(data["$given"]))
    if "$callable" in data:
        raise ValueError(f"a callable ({data['$callable']}) in {where} cannot be loaded")
    if "$object" in data:
        cls = _find_class(str(data["$object"]))
        if cls is None:
            raise ValueError(f"unknown class {data['$object']!r} in {where}")
        obj = object.__new__(cls)
        for k, v in data["state"].items():
            if not (isinstance(k, str) and k.isidentifier() and not k.startswith("__")):
                raise ValueError(f"attribute name {k!r} in {where}")
            object.__setattr__(obj, k, decode(v, tensors, f"{where}.{k}"))
        return obj
    raise ValueError(f"unexpected entry {data!r} in {where}")


# ------------------------------------------------------------------------------------ files
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(state: dict[str, Any]) -> str:
    """SHA-256 over a state dict's tensors (names, dtypes, shapes, bytes; non-tensor entries
    such as neuraloperator's ``_metadata`` ignored): equal for the same weights wherever they
    were saved, loaded or moved."""
    h = hashlib.sha256()
    for key in sorted(k for k, v in state.items() if isinstance(v, Tensor)):
        t = state[key].detach()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        flat = t.cpu().contiguous().reshape(-1)
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_record(path: Path, call: str) -> dict[str, Any]:
    """The JSON record of a sidecar, checked for the fields every version has."""
    try:
        text = path.read_text(encoding="utf-8")
        record = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"{call}: {path.name} is not a constraint-layers sidecar (not a JSON record: {e}); "
            "the file is damaged or not the one save_checkpoint wrote. Save the checkpoint "
            "again, or pass the constraints yourself and delete the file."
        ) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(
            f"{call}: {path.name} is not a constraint-layers sidecar (expected a JSON object "
            f"with format {FORMAT!r}); the file is damaged or not the one save_checkpoint wrote."
        )
    version = record.get("version")
    if not isinstance(version, int) or version < 2:
        raise CheckpointError(f"{call}: {path.name} has no valid version ({version!r}).")
    if version > VERSION:
        raise CheckpointError(
            f"{call}: {path.name} has version {version}, newer than this version of "
            f"constraint-layers reads ({VERSION}); upgrade constraint-layers."
        )
    need = ("layer", "model", "weights", "constraints", "options", "tensors", "description")
    missing = [k for k in need if k not in record]
    if missing:
        raise CheckpointError(
            f"{call}: {path.name} lacks the field(s) {missing}; the file is damaged or not the "
            "one save_checkpoint wrote."
        )
    return record


def read_tensors(
    folder: Path, entry: dict[str, Any] | None, sidecar: Path, call: str, map_location: Any
) -> dict[str, Tensor]:
    """The tensor table a record refers to (``{}`` when it has none), checked against the
    SHA-256 the record holds; read with ``weights_only=True``."""
    if entry is None:
        return {}
    try:
        path = folder / str(entry["file"])
        digest = str(entry["sha256"])
    except (KeyError, TypeError):
        raise CheckpointError(f"{call}: {sidecar.name} has a damaged 'tensors' entry.") from None
    if Path(entry["file"]).name != entry["file"] or not path.is_file():
        raise CheckpointError(
            f"{call}: {sidecar.name} keeps its tensors in {entry['file']!r}, which is missing "
            f"from {folder.name!r}: copy both files of the sidecar together."
        )
    if sha256_file(path) != digest:
        raise CheckpointError(
            f"{call}: {path.name} does not belong to {sidecar.name} (its SHA-256 differs from the "
            "one the sidecar recorded): the two files come from different checkpoints."
        )
    try:
        table = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{call}: cannot read {path.name}: {e}") from None
    if not isinstance(table, dict) or not all(isinstance(v, Tensor) for v in table.values()):
        raise CheckpointError(f"{call}: {path.name} is not a table of tensors.")
    return table


# ---------------------------------------------------------- neuraloperator's pickled files
#: Modules whose classes (``nn.Module`` subclasses) and functions neuraloperator's checkpoint
#: files may name: the model's init kwargs hold its activation (``F.gelu``), layer classes
#: (``SpectralConv``) and, for a UQNO, the base model itself.
_CLASS_MODULES = ("neuralop.", "tltorch.", "torch.nn.")
_FUNCTION_MODULES = ("neuralop.layers.", "torch.nn.functional", "torch._C._nn")


def _allowed(name: str) -> Any | None:
    """The object a pickle names as ``module.attr`` if it is allowed: an ``nn.Module`` class of
    neuraloperator, tensorly-torch or ``torch.nn``, or a function of neuraloperator's layers or
    ``torch.nn.functional`` (activations, contractions)."""
    module, _, attr = name.rpartition(".")
    if not (module + ".").startswith(_CLASS_MODULES + _FUNCTION_MODULES):
        return None
    try:
        obj = getattr(importlib.import_module(module), attr, None)
    except ImportError:
        return None
    if isinstance(obj, type):
        return obj if issubclass(obj, nn.Module) else None
    if callable(obj) and (module + ".").startswith(_FUNCTION_MODULES):
        return obj
    return None


def load_pickled(path: Path, call: str, map_location: Any, trusted: bool, flag: str) -> Any:
    """Read one of neuraloperator's files (its ``_metadata.pkl``, a plain model's state dict)
    without running code from it: ``weights_only=True``, allowing the globals it names only
    when they are ``nn.Module`` classes or functions of neuraloperator, ``torch.nn`` and
    tensorly-torch. ``trusted`` (the caller's ``flag=True``) reads it as a full pickle."""
    if trusted:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{call}: cannot read {path.name}: {e}") from None
    allowed = {n: _allowed(n) for n in names}
    refused = sorted(n for n, obj in allowed.items() if obj is None)
    if refused:
        raise CheckpointError(
            f"{call}: {path.name} names {refused}, which constraint-layers does not load from a "
            "pickle (only model classes and functions of neuraloperator and torch.nn are "
            f"allowed: a file holding other objects could run code when loaded). If you trust "
            f"this file, pass {flag}=True."
        )
    try:
        with torch.serialization.safe_globals(list(allowed.values())):
            return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{call}: cannot read {path.name} safely ({str(e).splitlines()[0]}). If you trust "
            f"this file, pass {flag}=True."
        ) from None
