"""Shim (private, kept for imports of the old path): the bounded solvers live in
:mod:`constraint_layers._engine.bounded`."""

from __future__ import annotations

from .._engine.bounded import active_bounds, project_bounded, project_bounded_rows

__all__ = ["active_bounds", "project_bounded", "project_bounded_rows"]
