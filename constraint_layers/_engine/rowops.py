"""Row operations of the engine (private): splitting constraints by their structure tags,
stacking the rows of several constraints into one system, naming rows in messages, the noise of
each row, and pulling rows back through the face-local step (``G S``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..rows import Rows
from .faces import apply_plan
from .tags import structure_of

__all__ = ["noise_per_row", "pull_back", "row_labels", "split_families", "stack_dense"]

F64 = torch.float64


def split_families(constraints: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """``(boundary, conservation)`` constraints, each in the order given: the face-local ones
    (tag ``face``) and the ones with few dense or per-frame rows (tags ``dense``, ``frame``)."""
    bnd = [c for c in constraints if structure_of(c) == "face"]
    con = [c for c in constraints if structure_of(c) in ("dense", "frame")]
    return bnd, con


def row_labels(constraints: Sequence[Any], counts: Sequence[int]) -> list[str]:
    out = []
    for c, m in zip(constraints, counts):
        out += [f"{c!r} row {i}" for i in range(m)]
    return out


def stack_dense(rows: Sequence[Rows], batch: int, n: int) -> tuple[Tensor, Tensor]:
    """Dense stacked ``(G, b)``: (M, N) or (batch, M, N) float64, and (batch, M)."""
    s = Rows.stack(rows, batch)
    return s.dense(n), s.rhs


def pull_back(G: Tensor, bplan: Any, shape: tuple[int, ...]) -> Tensor:
    """``G S``: the rows ``G`` composed with the linear part of the boundary step (float64).

    ``S`` is the adjoint taken by autograd through the step on a zero input with zero values:
    one batched pass over ``M`` grids (outside inference mode, where autograd is off: the
    result is a plain constant, also under ``torch.inference_mode()``).
    """
    lead = G.shape[:-1]
    m = math.prod(lead)
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros((m, *shape[1:]), dtype=F64, device=G.device, requires_grad=True)
        zeros = [
            torch.zeros((m, c.index.shape[0]), dtype=F64, device=G.device) for c in bplan.conds
        ]
        out = apply_plan(x, bplan, zeros)
        (gs,) = torch.autograd.grad(out, x, G.detach().reshape(m, *shape[1:]).to(F64))
    return gs.reshape(*lead, -1)


def noise_per_row(noise: Any, bnd_counts: Sequence[int], con_counts: Sequence[int]) -> Any:
    """Per-row noise of the stacked system: boundary rows exact, conservation rows ``noise``; a
    sequence gives one value per constraint (boundary first, in the order given)."""
    if isinstance(noise, (list, tuple)):
        vals = list(noise)
        counts = [*bnd_counts, *con_counts]
        return torch.cat([torch.full((m,), float(v), dtype=F64) for v, m in zip(vals, counts)])
    if isinstance(noise, Tensor) and noise.numel() > 1:
        return torch.cat([torch.zeros(sum(bnd_counts), dtype=F64), noise.to(F64).reshape(-1)])
    value = float(noise)
    if value == 0.0:
        return 0.0
    return torch.cat(
        [torch.zeros(sum(bnd_counts), dtype=F64), torch.full((sum(con_counts),), value, dtype=F64)]
    )
