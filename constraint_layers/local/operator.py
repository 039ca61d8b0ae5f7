"""The local operator ``C u = sum_k a_k D_k u_{c_k}``, matrix-free (private).

``u`` is a grid output ``(batch, channels, d1, ..., dn)``; ``C u`` has one row per node,
``(batch, d1, ..., dn)``. Each term ``k`` is a coefficient ``a_k``, a channel ``c_k``, an axis
and a derivative order; ``D_k`` is the one-dimensional operator of
``constraint_layers.local.stencils`` along that axis. The operator offers ``C``, ``C^T``,
the Fourier symbol per channel (every axis it differentiates periodic) and the Kronecker factors of
``C C^T`` for the separable fast solve (:mod:`constraint_layers.local.solve`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from .stencils import Stencil1D, stencil_1d

__all__ = ["LocalOperator", "Term"]

F64 = torch.float64


class Term(NamedTuple):
    """One term ``coefficient * d^order u_channel / d x_axis^order`` (axis: spatial, 0-based)."""

    coefficient: float
    channel: int
    axis: int
    order: int = 1


class LocalOperator:
    """``C`` for one grid: ``shape = (channels, d1, ..., dn)``, ``spacing`` per axis."""

    def __init__(
        self,
        terms: Sequence[Term],
        shape: Sequence[int],
        spacing: Sequence[float],
        stencil: str,
        periodic: Sequence[bool],
    ) -> None:
        self.terms = tuple(terms)
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(h) for h in spacing)
        self.stencil = stencil
        self.periodic = tuple(bool(p) for p in periodic)
        self.grid = self.shape[1:]
        self.ops: tuple[Stencil1D, ...] = tuple(
            stencil_1d(self.grid[t.axis], self.spacing[t.axis], t.order, stencil,
                       self.periodic[t.axis])
            for t in self.terms
        )  # fmt: skip
        self.channels = tuple(sorted({t.channel for t in self.terms}))
        self.axes = tuple(sorted({t.axis for t in self.terms}))

    @property
    def num_rows(self) -> int:
        return math.prod(self.grid)

    @property
    def fourier(self) -> bool:
        """Whether every differentiated axis is periodic (the FFT solve applies)."""
        return all(self.periodic[a] for a in self.axes)

    @property
    def separable(self) -> bool:
        """Whether each channel is differentiated along one axis only: ``C C^T`` is then a
        Kronecker sum, solved exactly by the separable fast solve."""
        return all(len({t.axis for t in self.terms if t.channel == c}) == 1 for c in self.channels)

    def apply(self, u: Tensor) -> Tensor:
        """``C u``: (batch, channels, *grid) -> (batch, *grid)."""
        out = None
        for t, op in zip(self.terms, self.ops):
            term = t.coefficient * op.apply(u[:, t.channel], t.axis + 1)
            out = term if out is None else out + term
        return out

    def transpose(self, v: Tensor) -> Tensor:
        """``C^T v``: (batch, *grid) -> (batch, channels, *grid) (zero on channels not read)."""
        parts = {}
        for t, op in zip(self.terms, self.ops):
            term = t.coefficient * op.transpose(v, t.axis + 1)
            parts[t.channel] = term if t.channel not in parts else parts[t.channel] + term
        zero = torch.zeros_like(v)
        return torch.stack([parts.get(c, zero) for c in range(self.shape[0])], 1)

    def row_scale(self) -> float:
        """``sum_k |a_k| max_i sum_j |(D_k)_ij|``: the size of the terms one row balances per
        unit of ``max |u|``."""
        return sum(abs(t.coefficient) * op.abs_row_sum() for t, op in zip(self.terms, self.ops))

    def symbols(self) -> Tensor:
        """Per channel read, the symbol over the ``rfftn`` grid of all spatial axes:
        (len(channels), *rfft grid), complex128."""
        d = len(self.grid)
        out = []
        for c in self.channels:
            s = torch.zeros(_rfft_shape(self.grid), dtype=torch.complex128)
            for t, op in zip(self.terms, self.ops):
                if t.channel != c:
                    continue
                sym = op.symbol()
                if t.axis == d - 1:
                    sym = sym[: self.grid[-1] // 2 + 1]
                view = [1] * d
                view[t.axis] = -1
                s = s + t.coefficient * sym.reshape(view)
            out.append(s)
        return torch.stack(out)

    def factors(self, free: tuple | None = None) -> list[Tensor | None]:
        """Per spatial axis, the (n, n) Kronecker factor of ``C C^T`` (None: not differentiated).

        ``C C^T = sum_c M_c M_c^T`` with ``M_c`` the operator applied to channel ``c``; when each
        channel is differentiated along one axis, ``M_c = I x ... x A_c x ... x I`` and
        ``C C^T = sum_axes I x ... x F_axis x ... x I`` with ``F_axis = sum_{c on axis} A_c A_c^T``.
        Otherwise the cross terms of channels along several axes are left out (a
        preconditioner). ``free``: per term, a tuple of bools along its axis (the nodes that
        move; None: all): ``F_axis = sum_c A_c diag(free) A_c^T``, the preconditioner of the
        operator with Dirichlet nodes eliminated.
        """
        return list(
            _factors(self.terms, self.grid, self.spacing, self.stencil, self.periodic, free)
        )


def _rfft_shape(grid: Sequence[int]) -> tuple[int, ...]:
    return (*grid[:-1], grid[-1] // 2 + 1)


@lru_cache(maxsize=32)
def _factors(terms, grid, spacing, stencil, periodic, free) -> tuple[Tensor | None, ...]:
    out: list[Tensor | None] = [None] * len(grid)
    for axis in range(len(grid)):
        mats, keep = {}, {}
        for i, t in enumerate(terms):
            if t.axis != axis:
                continue
            d = stencil_1d(grid[axis], spacing[axis], t.order, stencil, periodic[axis]).dense()
            mats[t.channel] = t.coefficient * d + mats.get(t.channel, 0.0)
            if free is not None:
                keep[t.channel] = torch.tensor(free[i], dtype=F64)
        if mats:
            out[axis] = sum((m * keep.get(c, 1.0)) @ m.T for c, m in mats.items())
    return tuple(out)
