"""The dense float64 reference of the engine (private; public as
``cl.functional.dense_projection``): ``u - W C^T (C W C^T)^+ (C u - d)`` formed densely, for tests
and small problems. Every solver of the engine is compared with it (the testing mixin's references
in :mod:`constraint_layers.testing.reference` build on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..rows import Rows
from .rowops import stack_dense

__all__ = ["dense_projection"]

F64 = torch.float64


def dense_projection(
    u: Tensor, rows: Sequence[Rows], W: Tensor | None = None, *, sequential: bool = False
) -> Tensor:
    """The dense float64 reference: ``u - W C^T (C W C^T)^+ (C u - d)``.

    Parameters
    ----------
    u : Tensor
        shape: (batch, N). Not modified.
    rows : sequence of Rows
        Stacked into one system; with ``sequential=True`` each set is projected in turn with its
        own mobility (``V = W C^T`` replaced by the rows' directions): the boundary step.
    W : Tensor, optional
        shape: (N, N) or (batch, N, N); default the identity.

    Returns
    -------
    Tensor
        shape: (batch, N), float64.
    """
    x = u.to(F64)
    n = x.shape[-1]
    if sequential:
        for r in rows:
            C = r.dense(n).to(x.device)
            V = r.directions(n).to(x.device)
            res = x @ C.mT - r.rhs.to(x.device)
            x = x - (torch.linalg.pinv(C @ V) @ res.unsqueeze(-1)).squeeze(-1) @ V.mT
        return x
    C, d = stack_dense(rows, x.shape[0], n)
    C, d = C.to(x.device), d.to(x.device)
    Wm = torch.eye(n, dtype=F64, device=x.device) if W is None else W.to(F64)
    WC = Wm @ C.mT  # (.., N, M)
    res = (x.unsqueeze(-2) @ C.mT).squeeze(-2) - d
    coef = (torch.linalg.pinv(C @ WC) @ res.unsqueeze(-1)).squeeze(-1)
    return x - (WC @ coef.unsqueeze(-1)).squeeze(-1)
