"""One grid for every constraint of a wrapper (private).

The grid a wrapper is given (``spacing=`` or ``extent=``, and ``endpoint=``) is the grid of
every constraint it holds: the boundary conditions' stencils and the integrals' quadrature use the
same coordinates. An integral that states no grid of its own takes the wrapper's; one that states
the same values is kept; one that states other values (another extent, a fixed spacing where the
wrapper's follows the resolution, its own node coordinates) raises, naming both. A wrapper given
no grid (unit extent per axis, the default) leaves each integral's own description as it is.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

from .errors import GridError

__all__ = ["bind_grid"]

#: Two grid values agree when they differ by at most this, relative (values given as decimals).
SAME_RTOL = 1e-12


def _axis_value(value: Any, dim: int) -> float:
    """The wrapper's value (a number, or one per spatial axis) on spatial axis ``dim``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        n = len(value)
        if not -n <= dim < n:
            raise GridError(
                f"the integral's dim={dim} is out of range for a grid of {n} spatial axes"
            )
        return float(value[dim % n])
    return float(value)


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SAME_RTOL, abs_tol=0.0)


def bind_grid(
    constraints: Sequence[Any],
    spacing: Any,
    extent: Any,
    endpoint: bool,
    call: str,
) -> tuple[Any, ...]:
    """The constraints with the wrapper's grid bound into every integral (copies; the user's
    objects are not changed). Raises :class:`~constraint_layers.errors.GridError` where an
    integral states a grid of its own that differs from the wrapper's."""
    if spacing is None and extent is None and endpoint:
        return tuple(constraints)
    kind, value = ("spacing", spacing) if spacing is not None else ("extent", extent)
    out = []
    for c in constraints:
        if c.family != "conservation" or not hasattr(c, "dims"):
            out.append(c)  # boundary conditions read the wrapper's grid; a matrix G has none
            continue
        own_spacing, own_extent = list(c.spacing), list(c.extent)
        for i, dim in enumerate(c.dims if value is not None else ()):
            try:
                want = _axis_value(value, dim)
            except GridError as err:
                raise GridError(f"{call}: {c!r}: {err}.") from None
            kind_i = kind
            given = {"spacing": c.spacing[i], "extent": c.extent[i]}
            if c.grid[i] is not None:
                raise GridError(
                    f"{call}: {c!r} gives its own node coordinates (grid=) on axis {dim}, but the "
                    f"wrapper's grid is {kind_i}={want!r}: the grid given to wrap is the grid of "
                    "every constraint. Give wrap no spacing=/extent= (the integral's nodes then "
                    "stand), or drop the integral's grid=."
                )
            for what, own in given.items():
                if own is None:
                    continue
                if what != kind_i or not _same(float(own), want):
                    raise GridError(
                        f"{call}: {c!r} states its own {what}={own!r} on axis {dim}, but the "
                        f"wrapper's grid has {kind_i}={want!r} there: the grid given to wrap is "
                        "the grid of every constraint (walls and integrals alike). Drop the "
                        f"integral's {what}= (it takes the wrapper's grid), or give the same "
                        "value to both."
                    )
            if kind_i == "spacing":
                own_spacing[i] = want
            else:
                own_extent[i] = want
        if c.endpoint != endpoint and value is not None and endpoint:
            raise GridError(
                f"{call}: {c!r} is stated on a grid without its end node (endpoint=False), but "
                "the wrapper's grid holds it (endpoint=True): the grid given to wrap is the grid "
                "of every constraint. Give wrap endpoint=False as well, or drop the integral's."
            )
        bound = copy.copy(c)
        bound.spacing, bound.extent = tuple(own_spacing), tuple(own_extent)
        bound.endpoint = c.endpoint and bool(endpoint)  # endpoint=False: the wrapper's grid
        out.append(bound)
    return tuple(out)
