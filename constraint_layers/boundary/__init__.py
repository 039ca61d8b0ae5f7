"""Boundary conditions (after BOON): conditions, the face-local output step, kernel refinement."""

from __future__ import annotations

from typing import Any

from .conditions import BoundaryCondition, Dirichlet, Neumann, Periodic

__all__ = ["BoundaryCondition", "BoundaryCorrection", "Dirichlet", "Neumann", "Periodic"]


def __getattr__(name: str) -> Any:  # the layer lives in constraint_layers.layer (no import cycle)
    if name == "BoundaryCorrection":
        from ..layer import BoundaryCorrection

        return BoundaryCorrection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
