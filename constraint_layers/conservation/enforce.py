"""Shim (private, kept for imports of the old path): conditioning on conservation rows (the
per-frame streaming path and the grid view of an output) lives in
:mod:`constraint_layers._engine.streaming`."""

from __future__ import annotations

from .._engine.streaming import (
    METRICS,
    _posterior,
    condition,
    enforce_conservation,
    flat_event,
    grid_view,
)

__all__ = ["METRICS", "_posterior", "condition", "enforce_conservation", "flat_event", "grid_view"]
