"""The base of every constraint layer: one wrapped model, one adapter (private)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["TOLERANCE", "ConstraintLayer", "check_normalizer", "current_normalizer"]

#: Relative tolerance of the residual checks (debug mode, tests) by dtype.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.bfloat16: 5e-2,
    torch.float16: 5e-3,
}


class ConstraintLayer(nn.Module):
    """A module that holds the wrapped model under the single name ``model``.

    The wrapper's ``state_dict`` is the model's under the prefix ``model.``; ``unwrap`` returns the
    very object that was wrapped. Adapters customise a wrapper instance through ``attach`` (hooks),
    never by subclassing the model.
    """

    def __init__(self, model: nn.Module, adapter: Any = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: expected the model to be a torch.nn.Module, got "
                f"{type(model).__name__}."
            )
        self.model = model
        if adapter is None:
            from .adapters import find  # the registry: model-agnostic, imports no model library

            adapter = find(model)
        self.adapter = adapter
        self._handles: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        # nn.Module's lookup (parameters, buffers, submodules) first; then what the adapter offers
        # on the model library's behalf (e.g. neuraloperator's save_checkpoint). The adapter is
        # read from __dict__ so that a half-built or half-unpickled wrapper never recurses here.
        try:
            return super().__getattr__(name)
        except AttributeError:
            adapter = self.__dict__.get("adapter")
            if adapter is None or (name.startswith("__") and name.endswith("__")):
                raise
        return adapter.wrapper_attribute(self, name)

    def _attach(self) -> None:
        """Let the adapter install its hooks; subclasses call this last in ``__init__``."""
        self.adapter.attach(self)

    def add_handle(self, handle: Any) -> None:
        """Keep a hook handle that :meth:`release` removes (hooks on the wrapped model)."""
        self._handles.append(handle)

    def release(self) -> nn.Module:
        """Remove every hook this wrapper placed on the model and return the model."""
        while self._handles:
            self._handles.pop().remove()
        return self.model


def check_normalizer(obj: object, call: str) -> object:
    """Validate an output normaliser (``transform`` / ``inverse_transform``) or its holder."""
    if obj is None or (hasattr(obj, "transform") and hasattr(obj, "inverse_transform")):
        return obj
    if hasattr(obj, "out_normalizer"):
        return obj
    raise TypeError(
        f"{call}: normalizer must have transform() and inverse_transform() (e.g. neuraloperator's "
        "UnitGaussianNormalizer) or hold one as .out_normalizer (e.g. a DefaultDataProcessor); got "
        f"{type(obj).__name__}."
    )


def current_normalizer(obj: object) -> Any:
    """The normaliser to use now: ``obj`` itself, or ``obj.out_normalizer`` read at this call (so a
    normaliser fitted after wrapping is used)."""
    if obj is None or hasattr(obj, "transform"):
        return obj
    return obj.out_normalizer
