"""Constraints on point clouds: outputs ``(batch, n_points, channels)`` at scattered points.

A model that predicts at scattered query points (neuraloperator's GINO and FNOGNO, a GP evaluated
at test points, any model declared with ``cl.wrap(..., layout="points")``) takes constraints
stated on points:

- ``cl.Dirichlet(value, points=mask_or_indices)``: prescribed values at points (bit-exact; no
  other value moves);
- :class:`NormalComponent`: ``u . n = value`` at points (no penetration through a surface);
- ``cl.Conservation.integral(total, weights=w)``: ``sum_p w_p u_p = total`` per channel, with
  quadrature weights per point (:func:`voronoi_weights`, :func:`mesh_weights`);
- ``cl.Conservation(G, b)`` over the flattened cloud (point-major: entry ``p * C + c``);
- ``cl.Bounds``, as on grids.

All of them jointly, on deterministic and Gaussian outputs; see
``constraint_layers.pointcloud.solve`` for the solver.
"""

from __future__ import annotations

from .constraints import NormalComponent, PointConstraint, PointIntegral, PointValue
from .solve import check_point_constraints, project_points
from .weights import mesh_weights, voronoi_weights

__all__ = [
    "NormalComponent",
    "PointConstraint",
    "PointIntegral",
    "PointValue",
    "check_point_constraints",
    "mesh_weights",
    "project_points",
    "voronoi_weights",
]
