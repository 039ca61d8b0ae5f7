"""constraint-layers: hard physics constraints as drop-in layers for operator-learning models.

>>> import torch, constraint_layers as cl
>>> net = torch.nn.Conv1d(1, 1, 5, padding=2)
>>> model = cl.wrap(net, cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high"))
>>> y = model(torch.randn(4, 1, 101))
>>> bool(cl.metrics.boundary_error(y, model.bcs).max() < 1e-3)
True
"""

from __future__ import annotations

from . import (
    adapters,
    errors,
    functional,
    local,
    metrics,
    pointcloud,
    problems,
    quadrature,
    rows,
)
from ._values import Given
from .adapters import unwrap, wrap
from .boundary import BoundaryCondition, Dirichlet, Neumann, Periodic
from .bounds import Bounds
from .conservation import Conservation, IntegralConservation, mass_over_time
from .layer import BoundaryCorrection, ConservationProjection, ConstraintLayer
from .local import Continuity, DivergenceFree, LinearPDE
from .pointcloud import NormalComponent
from .rows import GridSpec, Rows

__version__ = "0.1.0.dev0"

__all__ = [
    "BoundaryCondition",
    "BoundaryCorrection",
    "Bounds",
    "Conservation",
    "ConservationProjection",
    "ConstraintLayer",
    "Continuity",
    "Dirichlet",
    "DivergenceFree",
    "Given",
    "GridSpec",
    "IntegralConservation",
    "LinearPDE",
    "Neumann",
    "NormalComponent",
    "Periodic",
    "Rows",
    "adapters",
    "errors",
    "functional",
    "local",
    "mass_over_time",
    "metrics",
    "pointcloud",
    "problems",
    "quadrature",
    "rows",
    "unwrap",
    "wrap",
]
