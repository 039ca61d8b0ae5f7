"""Test helpers shipped with the library: dense references and the constraint-layer test mixin.

Adapter authors get the same checks the library runs on its own wrappers: subclass
:class:`ConstraintLayerTests` (or its flavours :class:`BoundaryLayerChecks` and
:class:`ConservationLayerTests`), say how to build the model, its input and the constraints, and
pytest collects the checks. The dense float64 reference is derived from the constraints' rows
(:func:`reference_prediction`) for every family and any mix.
"""

from __future__ import annotations

import torch

from .._tolerance import TOLERANCES, tolerance
from .base import ConstraintLayerTests
from .boundary import BoundaryLayerChecks
from .conservation import ConservationLayerTests
from .reference import (
    dense_update,
    reference_enforce,
    reference_prediction,
    relative_residual,
    rows_of,
)

#: The residual column of the tolerance table (kept under its first-release name).
RESIDUAL_TOL: dict[torch.dtype, float] = {d: t.residual for d, t in TOLERANCES.items()}

__all__ = [
    "RESIDUAL_TOL",
    "TOLERANCES",
    "BoundaryLayerChecks",
    "ConservationLayerTests",
    "ConstraintLayerTests",
    "dense_update",
    "reference_enforce",
    "reference_prediction",
    "relative_residual",
    "rows_of",
    "tolerance",
]
