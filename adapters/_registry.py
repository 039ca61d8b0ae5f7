"""The adapter registry: which adapter serves which model type (private; see the package).

Keys are types or dotted type names (``"neuralop.models.base_model.BaseModel"``), so registering
an adapter for a third-party model never imports that library. Lookup walks the model type's MRO:
the most specific registration wins, and the generic ``torch.nn.Module`` adapter is the last resort.
Third-party packages register through the entry-point group ``constraint_layers.adapters``; those
are loaded on the first lookup.
"""

from __future__ import annotations

import importlib
import sys
import threading
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

from constraint_layers.errors import NoAdapterError

from .base import Adapter

__all__ = ["ENTRY_POINT_GROUP", "compiled_inner", "find", "register", "registered"]

ENTRY_POINT_GROUP = "constraint_layers.adapters"

A = TypeVar("A", bound=type[Adapter])

_REGISTRY: dict[str, Adapter] = {}  # dotted type name -> adapter instance
_NAMES: dict[str, str] = {}  # adapter name -> first dotted type name it serves
#: Built-in adapters for third-party libraries, imported only when a model of theirs shows up.
_LAZY: dict[str, str] = {
    "neuralop.models.base_model.BaseModel": "constraint_layers.adapters.neuralop",
    "gpytorch.models.gp.GP": "constraint_layers.adapters.gpytorch",
    "neuralop.models.uqno.UQNO": "constraint_layers.adapters.uqno",
    "neuralop.models.gino.GINO": "constraint_layers.adapters.neuralop_points",
    "neuralop.models.fnogno.FNOGNO": "constraint_layers.adapters.neuralop_points",
}
_lock = threading.RLock()
_entry_points_loaded = False


def _key(target: type | str) -> str:
    if isinstance(target, str):
        if "." not in target:
            raise ValueError(
                f"register: a type given by name must be a dotted path 'package.module.Class', got "
                f"{target!r}."
            )
        return target
    if isinstance(target, type):
        return f"{target.__module__}.{target.__qualname__}"
    raise TypeError(
        f"register: expected a type or a dotted type name, got {type(target).__name__}."
    )


def register(*targets: type | str, replace: bool = False) -> Callable[[A], A]:
    """Class decorator: register an :class:`Adapter` subclass for model types.

    Parameters
    ----------
    *targets : type or str
        Model types, or their dotted names (``"mypkg.models.MyNet"``) so that registering imports
        nothing. Subclasses are served too, unless a more specific registration exists. Default: the
        adapter class's ``targets`` attribute.
    replace : bool, default False
        Allow replacing an existing registration for the same type (otherwise a duplicate raises).

    Raises
    ------
    ValueError
        A type already has an adapter, or the adapter's ``name`` is taken (and ``replace`` is
        False).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> class Twice(torch.nn.Module):
    ...     def forward(self, x):
    ...         return {"u": 2 * x}
    >>> @cl.adapters.register(Twice)
    ... class TwiceAdapter(cl.adapters.Adapter):
    ...     name = "doc-twice"
    ...     def read(self, output):
    ...         return super().read(output["u"])
    ...     def write(self, output, prediction):
    ...         return {**output, "u": prediction.mean}
    >>> wrapped = cl.wrap(Twice(), cl.Dirichlet(0.0))
    >>> float(wrapped(torch.ones(1, 1, 5))["u"][0, 0, 0])
    0.0
    >>> cl.adapters.unregister(TwiceAdapter)
    """

    given = [_key(t) for t in targets]  # validate eagerly: a typo fails at the decorator line

    def deco(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Adapter)):
            raise TypeError(
                f"register: expected a subclass of constraint_layers.adapters.Adapter, got {cls!r}."
            )
        keys = given or [_key(t) for t in cls.targets]
        if not keys:
            raise ValueError(
                f"register: {cls.__name__} names no model types; pass them to register(...) or set "
                "its `targets` attribute."
            )
        name = cls.name or cls.__name__
        with _lock:
            if not replace:
                taken = [k for k in keys if k in _REGISTRY]
                if taken:
                    raise ValueError(
                        f"register: {taken[0]} already has the adapter "
                        f"{_REGISTRY[taken[0]].name!r}; pass replace=True to override it."
                    )
                if name in _NAMES and _NAMES[name] not in keys:
                    raise ValueError(
                        f"register: an adapter named {name!r} is already registered (for "
                        f"{_NAMES[name]}); give the new one another `name`."
                    )
            adapter = cls()
            for k in keys:
                _REGISTRY[k] = adapter
            _NAMES.setdefault(name, keys[0])
        return cls

    return deco


def unregister(adapter_cls: type[Adapter]) -> None:
    """Remove every registration of ``adapter_cls`` (mainly for tests and interactive use)."""
    with _lock:
        for k in [k for k, a in _REGISTRY.items() if type(a) is adapter_cls]:
            del _REGISTRY[k]
        name = adapter_cls.name or adapter_cls.__name__
        _NAMES.pop(name, None)


def _load_entry_points() -> None:
    global _entry_points_loaded
    with _lock:
        if _entry_points_loaded:
            return
        _entry_points_loaded = True
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
            except Exception as exc:  # a broken plug-in must not break every lookup
                raise ImportError(
                    f"constraint_layers.adapters: the entry point {ep.name!r} = {ep.value!r} "
                    "of group "
                    f"{ENTRY_POINT_GROUP!r} failed to load: {exc}"
                ) from exc
            if isinstance(obj, type) and issubclass(obj, Adapter):
                if not any(a for a in _REGISTRY.values() if type(a) is obj):
                    register()(obj)
            # otherwise the module registered itself when it was imported


def compiled_inner(model: object) -> object:
    """The model that ``torch.compile(model)`` compiled (``OptimizedModule._orig_mod``, through
    any nesting), or ``model`` itself when it is not a compiled module."""
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # not imported: nothing was compiled
    compiled = getattr(dynamo, "OptimizedModule", None)
    while compiled is not None and isinstance(model, compiled):
        model = model._orig_mod
    return model


def find(model: object) -> Adapter:
    """The adapter for ``model``: the registration nearest to its type in the MRO.

    A compiled model (``torch.compile(model)``, an ``OptimizedModule``) is served by the adapter
    of the model it compiles, unless ``OptimizedModule`` itself has a registration.

    Raises
    ------
    NoAdapterError
        No registered adapter serves this type (the message lists the registered ones).
    """
    _load_entry_points()
    inner = compiled_inner(model)
    if inner is not model and _key(type(model)) not in _REGISTRY:
        return find(inner)
    for klass in type(model).__mro__:
        key = _key(klass)
        if key not in _REGISTRY and key in _LAZY:
            importlib.import_module(_LAZY[key])
        if key in _REGISTRY:
            return _REGISTRY[key]
    raise NoAdapterError(
        f"find: no adapter for a model of type {_shown(type(model))}. Registered: "
        f"{registered()}. Register one with @constraint_layers.adapters.register(YourModel) on a "
        "subclass of constraint_layers.adapters.Adapter, or through the entry-point group "
        f"{ENTRY_POINT_GROUP!r}."
    )


def _shown(klass: type) -> str:
    """A type's name as the user wrote it (``object``, not ``builtins.object``)."""
    return klass.__qualname__ if klass.__module__ == "builtins" else _key(klass)


def registered() -> dict[str, str]:
    """Registered model types and the name of the adapter serving each (lazy built-ins marked)."""
    with _lock:
        out = {k: a.name for k, a in _REGISTRY.items()}
    for k, mod in _LAZY.items():
        out.setdefault(k, f"{mod} (loaded on first use)")
    return out
