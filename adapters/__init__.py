"""Adapters: how constraint layers meet third-party models.

Installed as ``constraint_layers.adapters``.

One call adds a constraint to the model a user already has::

    wrapped = cl.wrap(model, cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high"))

:func:`wrap` finds the adapter registered for the model's type (walking its MRO), then builds the
constraint layer. Adapters for neuraloperator and gpytorch models are imported only when such a
model is wrapped: ``import constraint_layers`` imports neither library.
"""

from __future__ import annotations

from ._registry import ENTRY_POINT_GROUP, find, register, registered, unregister
from .base import Adapter
from .ensemble import Ensemble, EnsembleAdapter
from .generic import ModuleAdapter
from .wrap import unwrap, wrap

__all__ = [
    "ENTRY_POINT_GROUP",
    "Adapter",
    "ModuleAdapter",
    "find",
    "register",
    "registered",
    "unregister",
    "unwrap",
    "wrap",
]
__all__ += ["Ensemble", "EnsembleAdapter"]
