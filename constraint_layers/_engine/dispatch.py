"""The engine's one entry: read the constraints' structure tags, pick the solver (private).

As lineax's ``AutoLinearSolver`` reads an operator's tags and returns a solver, :func:`choose`
reads the tags of the constraints (:mod:`constraint_layers._engine.tags`), the layout of the
output and whether the prediction is Gaussian, and names the solver; :func:`project` runs it.
Mixed tags compose (``shared/design/local.md``): the face-local rows are eliminated (or, for a
Gaussian, conditioned on jointly), the dense rows act on the freedom left, and the bounds apply on
top of the equality rows.

===================  ===========================================  ================================
solver               when                                         where
===================  ===========================================  ================================
``points``           the output is a point cloud                  :mod:`..pointcloud.solve`
``local``            a ``local`` tag (one row per node), with     :mod:`..local.project`
                     any ``face``, ``dense``/``frame`` rows and
                     bounds on top
``bounded``          a ``bounded`` tag: the equality rows         :mod:`.bounded.joint`
                     through this dispatcher first, then the
                     bounded step when the result leaves the box
``faces``            ``face`` tags only, deterministic output     :func:`.dense.with_walls`
``faces+dense``      ``face`` and ``dense``/``frame``,            :func:`.dense.with_walls`
                     deterministic: the dense rows on the
                     freedom the face step leaves
``joint-gaussian``   ``face`` tags, Gaussian output: all rows     :func:`.dense.with_walls`
                     conditioned on at once
``streaming``        one ``frame`` constraint, diagonal (or no)   :func:`.dense.condition_rows`
                     covariance: one-row updates per frame
``dense``            ``dense``/``frame`` rows otherwise: the      :func:`.dense.condition_rows`
                     ``M x M`` solve (the Gaussian kernel)
===================  ===========================================  ================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..conservation.gaussian import Gaussian
from ..rows import DEFAULT_GRID, GridSpec
from . import dense
from .rowops import split_families
from .tags import POINTS, structure_of

__all__ = ["SOLVERS", "choose", "project", "tags_of"]

#: The solvers :func:`choose` names, in the order it tries them.
SOLVERS = (
    "points",
    "local",
    "bounded",
    "faces",
    "faces+dense",
    "joint-gaussian",
    "streaming",
    "dense",
)


def tags_of(constraints: Sequence[Any]) -> tuple[str, ...]:
    """The structure tag of each constraint, in the order given."""
    return tuple(structure_of(c) for c in constraints)


def choose(constraints: Sequence[Any], pred: Gaussian, *, layout: str = "grid") -> str:
    """The name of the solver for these constraints on this prediction (one of :data:`SOLVERS`).

    Parameters
    ----------
    constraints : sequence of constraints
        Each carries a structure tag (``structure``; else its family's).
    pred : Gaussian
        The prediction record; deterministic when it has no variance, covariance or low rank.
    layout : {"grid", "points"}
        How the output is laid out.
    """
    tags = set(tags_of(constraints))
    if layout == POINTS or POINTS in tags:
        return "points"
    if "local" in tags:
        return "local"
    if "bounded" in tags:
        return "bounded"
    rows = tags & {"dense", "frame"}
    if "face" in tags:
        if not dense.is_deterministic(pred):
            return "joint-gaussian"
        return "faces+dense" if rows else "faces"
    structured = pred.covariance is None and pred.low_rank is None
    if len(constraints) == 1 and tags == {"frame"} and structured:
        return "streaming"
    return "dense"


def project(
    pred: Gaussian,
    constraints: Sequence[Any],
    *,
    layout: str = "grid",
    grid: GridSpec = DEFAULT_GRID,
    lift: int = 0,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    call: str = "project",
) -> Gaussian:
    """Enforce ``constraints`` on one prediction (a deterministic one: a Gaussian without
    uncertainty) by the solver :func:`choose` names; returns the constrained prediction in the
    same layout and dtype.

    The arguments are checked already (the layer, :func:`constraint_layers.functional.project`).
    ``noise``: a number (conservation rows; boundary rows are exact) or one value per
    constraint.
    """
    solver = choose(constraints, pred, layout=layout)
    opts = dict(grid=grid, lift=lift, noise=noise, metric=metric, grid_shape=grid_shape,
                inputs=inputs, call=call)  # fmt: skip
    return _RUN[solver](pred, constraints, opts)


def _points(pred: Gaussian, constraints: Sequence[Any], opts: dict) -> Gaussian:
    from ..pointcloud.solve import project_points

    return project_points(
        pred, constraints, noise=opts["noise"], metric=opts["metric"], inputs=opts["inputs"],
        call=opts["call"],
    )  # fmt: skip


def _local(pred: Gaussian, constraints: Sequence[Any], opts: dict) -> Gaussian:
    from ..local.project import project_record

    return project_record(pred, constraints, **opts)


def _bounded(pred: Gaussian, constraints: Sequence[Any], opts: dict) -> Gaussian:
    from .bounded import joint

    rows = [c for c in constraints if structure_of(c) != "bounded"]
    bounds = [c for c in constraints if structure_of(c) == "bounded"]
    return joint.project_with_bounds(
        pred, rows, bounds, equality=lambda p: project(p, rows, **opts), **opts
    )


def _walls(pred: Gaussian, constraints: Sequence[Any], opts: dict) -> Gaussian:
    bnd, con = split_families(constraints)
    return dense.with_walls(pred, bnd, con, **opts)


def _rows(pred: Gaussian, constraints: Sequence[Any], opts: dict) -> Gaussian:
    _, con = split_families(constraints)
    return dense.condition_rows(
        pred, con, noise=opts["noise"], metric=opts["metric"], grid_shape=opts["grid_shape"],
        inputs=opts["inputs"], call=opts["call"],
    )  # fmt: skip


_RUN: dict[str, Callable[[Gaussian, Sequence[Any], dict], Gaussian]] = {
    "points": _points,
    "local": _local,
    "bounded": _bounded,
    "faces": _walls,
    "faces+dense": _walls,
    "joint-gaussian": _walls,
    "streaming": _rows,
    "dense": _rows,
}
