"""Pure tensor functions behind the constraint layers (no module state; imports no layer).

A layer's ``forward`` is the model call plus the projection these functions compute:
:func:`project` is the joint entry (any mix of constraints, the layer's path);
:func:`condition_gaussian` the Gaussian conditioning kernel (``conserve`` is its deprecated
alias); the others serve one family each.
"""

from __future__ import annotations

from ._engine.faces import boundary_residuals, boundary_rows, enforce_boundary
from ._engine.gaussian import condition_gaussian, conserve
from ._engine.reference import dense_projection
from ._engine.streaming import enforce_conservation
from ._joint import project
from .conservation.constraint import conservation_rows
from .conservation.gaussian import Gaussian
from .conservation.mixture import MixtureMoments, RunningMoments, conserve_mixture
from .conservation.posterior import ConstrainedGaussian, DegenerateGaussian
from .local.gaussian import LocalGaussian, condition_local
from .local.project import enforce_local
from .rows import Rows

#: The prediction record adapters read and write (a deterministic one has no variance).
Prediction = Gaussian

__all__ = [
    "ConstrainedGaussian",
    "DegenerateGaussian",
    "Gaussian",
    "LocalGaussian",
    "MixtureMoments",
    "Prediction",
    "Rows",
    "RunningMoments",
    "boundary_residuals",
    "boundary_rows",
    "condition_gaussian",
    "condition_local",
    "conservation_rows",
    "conserve",
    "conserve_mixture",
    "dense_projection",
    "enforce_boundary",
    "enforce_conservation",
    "enforce_local",
    "project",
]
