"""Local constraints: one row per grid node, solved matrix-free.

- :mod:`.stencils`: the one-dimensional derivative operators, stated exactly;
- :mod:`.operator`: ``C u = sum_k a_k D_k u_{c_k}`` with ``C^T``, symbols and Kronecker factors;
- :mod:`.constraint`: :class:`LinearPDE` and its presets :class:`DivergenceFree`,
  :class:`Continuity` (rows tagged ``structure = "local"``);
- :mod:`.solve`: the FFT projection, preconditioned CG with an implicit backward;
- :mod:`.project`: the entry points (deterministic, Dirichlet walls, diagonal Gaussian).
"""

from __future__ import annotations

from .constraint import Continuity, DivergenceFree, LinearPDE, LocalRows, Term
from .project import LocalGaussian, condition_local, enforce_local, is_local, project_local

__all__ = [
    "Continuity",
    "DivergenceFree",
    "LinearPDE",
    "LocalGaussian",
    "LocalRows",
    "Term",
    "condition_local",
    "enforce_local",
    "is_local",
    "project_local",
]
