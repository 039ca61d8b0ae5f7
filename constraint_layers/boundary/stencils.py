"""One-sided finite-difference stencils and lift profiles (private).

Outward-normal derivative at a face, written on the nodes counted inward from the face
(``u_0`` on the face, ``u_1`` next to it, ...)::

    du/dn ~= (1 / h) * sum_k c_k u_k

The same coefficients serve both ends because the outward normal flips with the direction in
which the nodes are counted. At the high end they give the usual backward difference
``(11 u_{N-1} - 18 u_{N-2} + 9 u_{N-3} - 2 u_{N-4}) / (6 h)`` (order 3); at the low end they give
``-du/dx``.
"""

from __future__ import annotations

import math
from functools import lru_cache

__all__ = ["OUTWARD_STENCILS", "lift_profile", "neumann_lift_profile", "ramp"]

#: Outward one-sided first-derivative coefficients by order of accuracy.
OUTWARD_STENCILS: dict[int, tuple[float, ...]] = {
    1: (1.0, -1.0),
    2: (1.5, -2.0, 0.5),
    3: (11.0 / 6.0, -3.0, 1.5, -1.0 / 3.0),
}


@lru_cache(maxsize=64)
def lift_profile(k: int) -> tuple[float, ...]:
    """Smooth weights ``phi_0 = 1, ..., phi_k`` decaying to zero at node ``k + 1``.

    ``phi_j = (1 + cos(pi j / (k + 1))) / 2``: flat at the face and at the far end, so a correction
    spread with it adds no kink next to the boundary.
    """
    return tuple(0.5 * (1.0 + math.cos(math.pi * j / (k + 1))) for j in range(k + 1))


@lru_cache(maxsize=64)
def neumann_lift_profile(k: int) -> tuple[float, ...]:
    """Slope-correcting weights ``psi_j = j * phi_j`` (``psi_0 = 0``) for a Neumann lift.

    A Neumann correction must change the discrete normal derivative, which a profile that is flat at
    the face cannot do; ``psi`` has unit slope at the face and tapers smoothly to zero.
    """
    return tuple(j * p for j, p in enumerate(lift_profile(k)))


@lru_cache(maxsize=256)
def ramp(size: int, low: int, high: int, width: int) -> tuple[float, ...]:
    """Tangential weights along an axis of ``size`` nodes: 0 on the ``low`` first and ``high`` last
    nodes, rising smoothly to 1 over ``width`` nodes."""
    out = []
    for i in range(size):
        d = min(i - low, size - 1 - high - i)  # distance into the free region (negative: masked)
        if d < 0:
            out.append(0.0)
        elif d >= width:
            out.append(1.0)
        else:
            out.append(0.5 * (1.0 - math.cos(math.pi * (d + 1) / (width + 1))))
    return tuple(out)
