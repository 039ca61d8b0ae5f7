"""The structure tags the engine dispatches on (private).

Every constraint, and every set of rows, carries one tag saying how its rows are built; the
dispatcher (:mod:`constraint_layers._engine.dispatch`) reads them as lineax's
``AutoLinearSolver`` reads an operator's tags:

==========  =========================================================================
tag         rows
==========  =========================================================================
``face``    face-local rows (Dirichlet, Neumann, periodic): each moves its own nodes,
            solved in closed form face by face
``frame``   disjoint rows, one per frame (a quadrature total per time frame):
            streamed, one row at a time
``dense``   a few dense rows (general ``G u = b``): an ``M x M`` solve
``local``   one row per node, an operator (stencil or symbol): FFT or preconditioned CG
``bounded`` box bounds: solved on top of the equality rows (active set, separable)
==========  =========================================================================

Constraints stated on the points of a point cloud are tagged ``points``: their rows are solved by
the point-cloud engine (:mod:`constraint_layers.pointcloud.solve`), chosen by the output's layout.
"""

from __future__ import annotations

from typing import Any

__all__ = ["POINTS", "TAGS", "structure_of"]

#: The tag vocabulary of rows on grids.
TAGS = ("face", "frame", "dense", "local", "bounded")
#: The tag of constraints stated on the points of a point cloud.
POINTS = "points"

_BY_FAMILY = {
    "boundary": "face",
    "conservation": "dense",
    "bounds": "bounded",
    "local": "local",
    "points": POINTS,
}


def structure_of(constraint: Any) -> str:
    """The structure tag of a constraint: its ``structure`` attribute, else its family's."""
    tag = getattr(constraint, "structure", None)
    if isinstance(tag, str):
        return tag
    family = getattr(constraint, "family", None)
    if family in _BY_FAMILY:
        return _BY_FAMILY[family]
    raise TypeError(
        f"the engine: expected a constraint with a structure tag (one of {TAGS}) or a family, got "
        f"{type(constraint).__name__}."
    )
