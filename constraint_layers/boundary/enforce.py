"""Shim (private, kept for imports of the old path): the face-local output step lives in
:mod:`constraint_layers._engine.faces`."""

from __future__ import annotations

from .._engine.faces import (
    BoundaryPlan,
    apply_plan,
    boundary_residuals,
    boundary_rows,
    check_lift,
    condition_rhs,
    conditions,
    enforce_boundary,
    plan,
)

__all__ = [
    "BoundaryPlan",
    "apply_plan",
    "boundary_residuals",
    "boundary_rows",
    "check_lift",
    "condition_rhs",
    "conditions",
    "enforce_boundary",
    "plan",
]
