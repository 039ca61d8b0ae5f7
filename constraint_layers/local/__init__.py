"""Local constraints: one row per grid node, solved matrix-free.

- ``stencils``: the one-dimensional derivative operators, stated exactly;
- ``operator``: ``C u = sum_k a_k D_k u_{c_k}`` with ``C^T``, symbols and Kronecker factors;
- ``constraint``: :class:`LinearPDE` and its presets :class:`DivergenceFree`,
  :class:`Continuity` (rows tagged ``structure = "local"``);
- ``solve``: the FFT projection, the separable fast solve, preconditioned CG;
- ``transforms``: the DCT-II by FFT (the fast solve's cosine transform);
- ``capacitance``: the exact solve next to Dirichlet walls (Woodbury over the nodes beside them);
- ``stacked``: several local constraints in one call;
- ``implicit``: the CG projections as autograd functions with an implicit backward;
- ``totals``: a few dense rows next to the local ones (Schur complement);
- ``bounded``: box bounds with local rows (active set over the local solver);
- ``project``: the deterministic entry points (walls of any kind, totals);
- ``gaussian``: Gaussians conditioned on local rows (the entry; diagonal variances, bounds);
- ``covariance``: full, low-rank and operator covariances, walls of any kind (staged, CG).
"""

from __future__ import annotations

from .constraint import Continuity, DivergenceFree, LinearPDE, LocalRows, Term
from .covariance import LocalConditioned
from .gaussian import LocalGaussian, condition_local
from .operator import LocalOperator
from .project import enforce_local, is_local, project_local

__all__ = [
    "Continuity",
    "DivergenceFree",
    "LinearPDE",
    "LocalConditioned",
    "LocalGaussian",
    "LocalOperator",
    "LocalRows",
    "Term",
    "condition_local",
    "enforce_local",
    "is_local",
    "project_local",
]
