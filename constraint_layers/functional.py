"""Pure tensor functions behind the constraint layers (no module state).

Each layer's ``forward`` is the model call plus one of these functions.
"""

from __future__ import annotations

from ._boundary_ops import BoundaryRows, boundary_residuals, boundary_rows, enforce_boundary
from ._conservation_ops import (
    ConstrainedGaussian,
    DegenerateGaussian,
    Gaussian,
    MixtureMoments,
    RunningMoments,
    conserve,
    conserve_mixture,
)
from .conservation import ConservationRows, conservation_rows, enforce_conservation

__all__ = ["BoundaryRows", "boundary_residuals", "boundary_rows", "enforce_boundary"]
__all__ += [
    "ConservationRows",
    "ConstrainedGaussian",
    "DegenerateGaussian",
    "Gaussian",
    "MixtureMoments",
    "RunningMoments",
    "conservation_rows",
    "conserve",
    "conserve_mixture",
    "enforce_conservation",
]
