"""Pure tensor functions behind the constraint layers (no module state).

Each layer's ``forward`` is the model call plus one of these functions.
"""

from __future__ import annotations

from ._boundary_ops import BoundaryRows, boundary_residuals, boundary_rows, enforce_boundary

__all__ = ["BoundaryRows", "boundary_residuals", "boundary_rows", "enforce_boundary"]
