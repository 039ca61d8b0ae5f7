"""Pure tensor functions behind the constraint layers (no module state).

Each layer's ``forward`` is the model call plus one of these functions.
"""

from __future__ import annotations

from .boundary.enforce import BoundaryRows, boundary_residuals, boundary_rows, enforce_boundary
from .conservation.conserve import (
    ConstrainedGaussian,
    Gaussian,
    MixtureMoments,
    RunningMoments,
    conserve,
    conserve_mixture,
)
from .conservation.constraint import ConservationRows, conservation_rows, enforce_conservation

__all__ = ["BoundaryRows", "boundary_residuals", "boundary_rows", "enforce_boundary"]
__all__ += [
    "ConservationRows",
    "ConstrainedGaussian",
    "Gaussian",
    "MixtureMoments",
    "RunningMoments",
    "conservation_rows",
    "conserve",
    "conserve_mixture",
    "enforce_conservation",
]
