"""On-disk cache of generated data sets.

Format
------
One file per data set, ``<problem>-<key>.pt``, where ``<key>`` is the first 24 hex digits of the
SHA-256 of the *specification*: a JSON object (sorted keys, no spaces) holding every parameter that
made the data (the problem, its physical constants, the generator version, the number of samples,
the grid, the times, the seed, the dtype, the solver settings). The file is written with
``torch.save`` (atomically: a temporary file renamed into place) and holds a plain dict::

    {"format": "constraint-layers/problems-cache", "version": 1,
     "spec": <the specification as its JSON string>,
     "checksum": <SHA-256 of the tensors: names, dtypes, shapes and bytes>,
     "tensors": {name: Tensor, ...}}

It loads with ``torch.load(weights_only=True)``. On load the stored specification must equal the
requested one and the checksum must match the tensors; otherwise :class:`CacheError` is raised and
the file is left alone (pass ``cache="refresh"`` to regenerate and overwrite it). A cache therefore
never answers for other parameters: a changed parameter changes the key, hence the file, and a file
that was edited, truncated or renamed is refused.

Directory: the ``cache_dir`` argument, else the environment variable ``CONSTRAINT_LAYERS_CACHE``,
else ``~/.cache/constraint-layers`` (``~`` is expanded when the data set is requested).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ENV_VAR",
    "FORMAT",
    "CacheError",
    "cache_path",
    "cached",
    "load",
    "resolve_cache_dir",
    "save",
    "spec_key",
]

ENV_VAR = "CONSTRAINT_LAYERS_CACHE"
FORMAT = "constraint-layers/problems-cache"
VERSION = 1
_DEFAULT_DIR = "~/.cache/constraint-layers"


class CacheError(ValueError):
    """A cache file cannot answer the request: unreadable, of another format, made for other
    parameters, or its tensors do not match their checksum."""


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: the argument, else ``$CONSTRAINT_LAYERS_CACHE``, else
    ``~/.cache/constraint-layers``; ``~`` is expanded here, at call time.

    Examples
    --------
    >>> from constraint_layers.problems.cache import resolve_cache_dir
    >>> resolve_cache_dir("some/dir").as_posix()
    'some/dir'
    """
    if cache_dir is not None:
        if not isinstance(cache_dir, str | os.PathLike):
            raise TypeError(
                f"cache: cache_dir must be a path (str or os.PathLike), got "
                f"{type(cache_dir).__name__}."
            )
        return Path(cache_dir).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(_DEFAULT_DIR).expanduser()


def _spec_json(spec: Mapping[str, Any]) -> str:
    try:
        return json.dumps(spec, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"cache: the data-set specification must be JSON-serialisable with finite numbers; "
            f"got {spec!r}."
        ) from exc


def spec_key(spec: Mapping[str, Any]) -> str:
    """The 24-hex-digit key of a specification (SHA-256 of its canonical JSON).

    Examples
    --------
    >>> from constraint_layers.problems.cache import spec_key
    >>> spec_key({"a": 1, "b": 2}) == spec_key({"b": 2, "a": 1})
    True
    >>> spec_key({"a": 1}) == spec_key({"a": 2})
    False
    """
    return hashlib.sha256(_spec_json(spec).encode()).hexdigest()[:24]


def cache_path(directory: Path, name: str, spec: Mapping[str, Any]) -> Path:
    """``directory / f"{name}-{spec_key(spec)}.pt"``."""
    return Path(directory) / f"{name}-{spec_key(spec)}.pt"


def _checksum(tensors: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save(path: Path, spec: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> None:
    """Write ``tensors`` with their specification to ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "spec": _spec_json(spec),
        "checksum": _checksum(tensors),
        "tensors": {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()},
    }
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path, spec: Mapping[str, Any]) -> dict[str, Tensor]:
    """Read the tensors in ``path``, checking that they were made for ``spec``.

    Raises
    ------
    CacheError
        The file is unreadable, not a cache file of this format, made for another specification,
        or its tensors do not match the stored checksum.
    """
    path = Path(path)
    hint = f"Delete {path} or pass cache='refresh' to regenerate it."
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: pickle, zip or torch errors
        raise CacheError(
            f"cache: cannot read {path} ({type(exc).__name__}: {exc}). {hint}"
        ) from exc
    if (
        not isinstance(payload, dict)
        or payload.get("format") != FORMAT
        or payload.get("version") != VERSION
    ):
        raise CacheError(f"cache: {path} is not a '{FORMAT}' file of version {VERSION}. {hint}")
    expected = _spec_json(spec)
    if payload.get("spec") != expected:
        raise CacheError(
            f"cache: {path} was made for other parameters.\n  stored:    {payload.get('spec')}\n"
            f"  requested: {expected}\n{hint}"
        )
    tensors = payload.get("tensors")
    if not isinstance(tensors, dict) or not all(isinstance(v, Tensor) for v in tensors.values()):
        raise CacheError(f"cache: {path} holds no tensors. {hint}")
    if payload.get("checksum") != _checksum(tensors):
        raise CacheError(
            f"cache: the tensors in {path} do not match their checksum (the file was modified). "
            f"{hint}"
        )
    return tensors


def cached(
    name: str,
    spec: Mapping[str, Any],
    make: Callable[[], dict[str, Tensor]],
    *,
    cache: bool | str = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Tensor]:
    """Load the data set of ``spec`` from the cache, or ``make()`` it and store it.

    Parameters
    ----------
    cache : bool or "refresh"
        True: read the file if it exists, else generate and write it. False: generate, touch no
        file. "refresh": generate and overwrite the file.
    """
    if cache not in (True, False, "refresh"):
        raise ValueError(f"cache: cache must be True, False or 'refresh', got {cache!r}.")
    if cache is False:
        return make()
    path = cache_path(resolve_cache_dir(cache_dir), name, spec)
    if cache is True and path.exists():
        return load(path, spec)
    tensors = make()
    save(path, spec, tensors)
    return tensors
