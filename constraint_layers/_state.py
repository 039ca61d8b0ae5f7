"""Tensors kept across calls (caches of structure), safe in every autograd context (private).

A cache filled during one call is read by later calls, which may run in another context:
PyTorch Lightning validates under ``torch.inference_mode()`` and then trains. A tensor made under
inference mode is an *inference tensor*, which autograd refuses to save for a backward pass; a
tensor made while gradients are recorded carries a graph. Cached tensors are therefore built
outside inference mode and without gradients (:func:`building_constants`), or turned into such
plain constants when they are stored (:func:`constant`, :class:`ConstantDict`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

__all__ = ["ConstantDict", "building_constants", "constant"]


@contextmanager
def building_constants() -> Iterator[None]:
    """Build tensors that outlive the call: outside inference mode, without gradients.

    Inside ``torch.inference_mode()`` the tensors made here are ordinary tensors, which a later
    training call may save for backward.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


def constant(value: Any) -> Any:
    """``value`` with every tensor in it (nested in tuples, lists, dicts) a plain constant: no
    inference tensor (cloned outside inference mode) and no autograd history (detached)."""
    if isinstance(value, Tensor):
        if value.is_inference():
            with building_constants():
                return value.clone()
        return value.detach()
    if isinstance(value, tuple):
        items = [constant(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [constant(v) for v in value]
    if isinstance(value, dict):
        return {k: constant(v) for k, v in value.items()}
    return value


class ConstantDict(dict):
    """A dict for a cache: every value stored is made a plain constant (:func:`constant`)."""

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, constant(value))

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]
