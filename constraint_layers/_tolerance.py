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

__all__ = ["TOLERANCES", "Tolerance", "tolerance"]


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
