"""Test helpers shipped with the library: dense references and test mixins for constraint layers."""

from __future__ import annotations

from .boundary import (
    RESIDUAL_TOL,
    BoundaryLayerChecks,
    reference_enforce,
    relative_residual,
)
from .conservation import ConservationLayerTests, dense_update

__all__ = [
    "RESIDUAL_TOL",
    "BoundaryLayerChecks",
    "ConservationLayerTests",
    "dense_update",
    "reference_enforce",
    "relative_residual",
]
