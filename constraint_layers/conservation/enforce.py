"""Shim (private, kept for imports of the old path): conditioning on conservation rows (the
per-frame streaming path and the grid view of an output) lives in
:mod:`constraint_layers._engine.streaming`."""

from __future__ import annotations

from .._engine.streaming import (
    METRICS,
    condition,
    enforce_conservation,
    flat_event,
    grid_view,
    stacked_posterior,
)
from .._engine.streaming import stacked_posterior as _posterior  # noqa: F401  (former name)

__all__ = [
    "METRICS",
    "condition",
    "enforce_conservation",
    "flat_event",
    "grid_view",
    "stacked_posterior",
]
