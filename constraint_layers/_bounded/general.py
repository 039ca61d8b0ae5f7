"""Shim (private, kept for imports of the old path): the general bounded solver lives in
:mod:`constraint_layers._engine.bounded.general`."""

from __future__ import annotations

from .._engine.bounded.general import active_bounds, project_bounded

__all__ = ["active_bounds", "project_bounded"]
