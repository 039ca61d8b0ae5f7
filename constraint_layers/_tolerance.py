"""The one table of tolerances by dtype (private).

``residual``: the largest residual of a constraint row after enforcement, relative to the size of
the terms it balances (``max |u| + |d|``, Neumann rows scaled by the spacing). It is what
``debug=True`` checks after every call and what the test mixins assert.
``reference``: how far two correct computations of the same result may differ, relative to the
size of the result (the fast paths against the dense float64 references).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["TOLERANCES", "Tolerance", "rank_cutoff", "tolerance"]


class Tolerance(NamedTuple):
    residual: float
    reference: float


#: Relative tolerances by dtype (architecture.md: float32 about 1e-5, float64 about 1e-12).
TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(1e-12, 1e-12),
    torch.float32: Tolerance(1e-5, 1e-5),
    torch.float16: Tolerance(5e-3, 5e-3),
    torch.bfloat16: Tolerance(5e-2, 5e-2),
    torch.complex128: Tolerance(1e-12, 1e-12),
    torch.complex64: Tolerance(1e-5, 1e-5),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerances of ``dtype`` (float32's for dtypes not in the table)."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


# ----------------------------------------------------------------- gp-objects (issue 21) ----
# Provisional: the numerical rank of a PSD matrix, shared by the root used for samples and the
# density of a degenerate posterior (conservation/posterior.py). gp-numerics owns this module and
# defines the same function in its rank/PSD section; on merging, keep theirs and delete this one.
#: Margin of the numerical rank over the rounding ``n * eps * scale`` of a PSD matrix.
RANK_FACTOR = 16.0


def rank_cutoff(
    dtype: torch.dtype, scale: float | torch.Tensor, n: int = 1
) -> float | torch.Tensor:
    """Eigenvalues (or squared pivots) of a PSD matrix at or below this are numerically zero.

    Parameters
    ----------
    dtype : torch.dtype
        The precision the matrix was computed in (not the one it is stored in).
    scale : float or Tensor
        Its largest eigenvalue (a tensor: one per batch entry, keepdim).
    n : int
        Its order.

    Returns
    -------
    float or Tensor
        ``RANK_FACTOR * n * eps(dtype) * scale``.
    """
    eps = float(torch.finfo(dtype).eps) if dtype.is_floating_point else 2.220446049250313e-16
    return RANK_FACTOR * max(int(n), 1) * eps * scale
