"""Several local constraints in one call: the projection onto all their rows at once (private).

``C = [C_1; ...; C_L]`` (one row per node and constraint), ``u~ = z - M C^T (C M C^T)^+ (C z -
f)``:

- constraints on disjoint channels: their rows are orthogonal (``C_i M C_j^T = 0``), so the
  projection is each constraint's projection in turn (exact, any solver each);
- otherwise, every differentiated axis periodic and nothing eliminated: per wavenumber, the
  projection onto the orthogonal complement of the ``L`` rows' symbols (an ``L x L`` Gram matrix
  per wavenumber, pseudo-inverted: rows that coincide there are one row);
- otherwise: CG on the stacked system ``C M C^T`` (``L`` blocks), preconditioned block-diagonally
  by each constraint's own (exact) solve, with the implicit backward of
  :func:`~constraint_layers.local.implicit.project_cg`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import IncompatibleConstraintsError, SingularConstraintError
from .implicit import _Project
from .operator import LocalOperator
from .solve import ACCEPT_RTOL, INCONSISTENT_RTOL, NULL_RTOL, System, _scale, _symbols, op_key, pcg

__all__ = ["StackedOperator", "disjoint", "fft_project_stacked", "project_stacked"]

F64 = torch.float64


def disjoint(ops: Sequence[LocalOperator]) -> bool:
    """Whether no two operators read the same channel."""
    seen: set[int] = set()
    for op in ops:
        if seen & set(op.channels):
            return False
        seen |= set(op.channels)
    return True


class StackedOperator:
    """``C = [C_1; ...; C_L]``: ``apply`` (batch, channels, *grid) -> (batch, L, *grid)."""

    def __init__(self, ops: Sequence[LocalOperator]) -> None:
        self.ops = tuple(ops)
        self.shape = ops[0].shape
        self.grid = ops[0].grid
        self.channels = tuple(sorted({c for op in ops for c in op.channels}))

    def apply(self, u: Tensor) -> Tensor:
        return torch.stack([op.apply(u) for op in self.ops], 1)

    def transpose(self, v: Tensor) -> Tensor:
        out = self.ops[0].transpose(v[:, 0])
        for i, op in enumerate(self.ops[1:], 1):
            out = out + op.transpose(v[:, i])
        return out

    def row_scale(self) -> float:
        return max(op.row_scale() for op in self.ops)


class StackedSystem(System):
    """``K = C M C^T`` for stacked rows, preconditioned block-diagonally by each block's solve."""

    def __init__(self, ops: Sequence[LocalOperator], mask: Tensor | None) -> None:
        self.op = StackedOperator(ops)
        self.mask = mask
        self.weight = None
        self.parts = [System(op, mask, None, exact=True) for op in ops]
        self.check = False
        self.row_scale = None
        self._cap_key = None

    def precondition(self, r: Tensor) -> Tensor:
        return torch.stack([s.precondition(r[:, i]) for i, s in enumerate(self.parts)], 1)

    def solve(
        self, rhs: Tensor, scale: Tensor, call: str, check: bool = True
    ) -> tuple[Tensor, int]:
        lam, res, it = pcg(self.matvec, self.precondition, rhs, scale)
        rel = float((res / scale).amax()) if res.numel() else 0.0
        if rel > ACCEPT_RTOL:
            if rel > INCONSISTENT_RTOL:
                raise IncompatibleConstraintsError(
                    f"{call}: the local constraints cannot hold together with these data: CG on "
                    f"their stacked rows left a relative residual of {rel:.3e} after {it} "
                    "iterations (rows that combine to zero with right-hand sides that do not, "
                    "or wall values with a net flux). Check that the constraints agree."
                )
            raise SingularConstraintError(
                f"{call}: CG on the stacked local rows stopped at a relative residual of "
                f"{rel:.3e} after {it} iterations: the constraints are nearly dependent. State "
                "them as one cl.LinearPDE where they share channels, or drop the redundant one."
            )
        return lam, it


def project_stacked(
    ops: Sequence[LocalOperator], z: Tensor, f: Tensor, mask: Tensor | None, call: str
) -> Tensor:
    """``z - M C^T (C M C^T)^+ (C z - f)`` for stacked rows by CG (float64; ``f`` (batch, L,
    *grid)), implicit backward."""
    system = StackedSystem(ops, mask)
    return _Project.apply(z, f, None, system, call)


def fft_project_stacked(ops: Sequence[LocalOperator], z: Tensor, f: Tensor, call: str) -> Tensor:
    """Per wavenumber, the Euclidean projection onto ``L`` rows (periodic, nothing eliminated;
    differentiable through the FFTs). ``f`` (batch, L, *grid)."""
    d = len(ops[0].grid)
    dims = tuple(range(2, 2 + d))
    chans = sorted({c for op in ops for c in op.channels})
    syms = []
    for op in ops:  # each symbol over the union of the channels read
        s = _symbols(op_key(op), z.device)
        full = torch.zeros((len(chans), *s.shape[1:]), dtype=s.dtype, device=z.device)
        for i, c in enumerate(op.channels):
            full[chans.index(c)] = s[i]
        syms.append(full)
    a = torch.stack(syms)  # (L, k, *rgrid)
    zh = torch.fft.rfftn(z[:, chans], dim=dims)  # (batch, k, *rgrid)
    fh = torch.fft.rfftn(f, dim=tuple(range(2, 2 + d)))  # (batch, L, *rgrid)
    r = torch.einsum("lk...,bk...->bl...", a, zh) - fh
    gram = torch.einsum("lk...,mk...->...lm", a, a.conj())  # (*rgrid, L, L) Hermitian
    lam, q = torch.linalg.eigh(gram)
    top = lam.amax(-1, keepdim=True).amax(tuple(range(d)), keepdim=True)
    keep = lam > NULL_RTOL**2 * top
    inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0).to(q.dtype)
    rl = r.movedim(1, -1).unsqueeze(-1)  # (batch, *rgrid, L, 1)
    rq = q.mH @ rl
    off = torch.where(keep.unsqueeze(-1), 0.0, rq).abs().detach()
    size = _scale(StackedOperator(ops), z, f).reshape(-1, *[1] * (off.ndim - 1))
    n = 1
    for s in ops[0].grid:
        n *= s
    if bool((off > INCONSISTENT_RTOL * size * n).any()):
        raise IncompatibleConstraintsError(
            f"{call}: the local constraints cannot hold together: at some wavenumber their rows "
            f"combine to zero but their right-hand sides do not (off by "
            f"{float(off.amax()) / n:.3e}, e.g. a source's mean, or two constraints that fix "
            "the same combination to different values)."
        )
    coef = (q @ (inv.unsqueeze(-1) * rq)).squeeze(-1).movedim(-1, 1)  # (batch, L, *rgrid)
    zh = zh - torch.einsum("lk...,bl...->bk...", a.conj(), coef)
    out = torch.fft.irfftn(zh, s=ops[0].grid, dim=dims)
    parts = list(z.unbind(1))
    for i, c in enumerate(chans):
        parts[c] = out[:, i]
    return torch.stack(parts, 1)
