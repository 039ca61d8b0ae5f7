"""Rows of ``C u = d``: the one form every constraint of the library states.

Every constraint here is linear in the model's output ``u`` (one sample, flattened in C order over
its event axes: ``(channels, d1, ..., dn)`` for a grid). A Dirichlet value, a Neumann stencil,
periodicity and a conservation integral are all rows ``c . u = d``. A constraint states its rows
for an output shape through ``Constraint.rows``; the projection engine
(:mod:`constraint_layers._engine.dispatch`) picks a solver from their structure tags.

Besides the coefficients, a row may carry its **mobility**: the nodes the face-local output step
moves to satisfy it and the direction of the move (``u <- u + v t`` with
``t = (d - c . u) / (c . v)``), and the **pivot**, the entry re-solved exactly at the end
(``u_p = (d - sum_{j != p} c_j u_j) / c_p``: a Dirichlet value holds to the bit, both ends of a
periodic pair end equal to the bit). Rows without mobility (conservation) move by the metric of
the projection (the model's covariance, or Euclidean).

Examples
--------
>>> import torch, constraint_layers as cl
>>> rows = cl.Dirichlet(2.0, dim=0, side="low").rows((3, 1, 5))
>>> rows.index.tolist(), rows.rhs.tolist()
([[0]], [[2.0], [2.0], [2.0]])
>>> rows.dense(5)
tensor([[1., 0., 0., 0., 0.]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["DEFAULT_GRID", "FAMILIES", "Constraint", "GridSpec", "Rows"]

F64 = torch.float64

#: The constraint families, in the order the engine applies them.
FAMILIES = ("boundary", "conservation", "bounds", "local", "points")


class GridSpec(NamedTuple):
    """How a grid output maps to coordinates: spacing (fixed) or extent (spacing recomputed from
    each output's size), per spatial axis, and whether the high end node is on the grid."""

    spacing: float | Sequence[float] | None = None
    extent: float | Sequence[float] | None = None
    endpoint: bool = True


#: The default grid: unit extent per axis, both end nodes on the grid.
DEFAULT_GRID = GridSpec()


class Rows(NamedTuple):
    """Rows ``C u = d`` over one sample's flattened output, with their mobility.

    Attributes
    ----------
    index : (M, K) long
        The flat positions each row reads (padded rows repeat a position with coefficient 0).
    coeff : (M, K) or (batch, M, K) float64
        Their coefficients.
    rhs : (batch, M) float64
        The right-hand sides ``d``.
    moves : (M, J) long, optional
        The positions the face-local step moves for each row (None: moved by the metric).
    weights : (M, J) float64, optional
        The direction of that move at those positions.
    pivot : (M,) long, optional
        The column of ``index`` re-solved exactly at the end of the face-local step.
    """

    index: Tensor
    coeff: Tensor
    rhs: Tensor
    moves: Tensor | None = None
    weights: Tensor | None = None
    pivot: Tensor | None = None

    @property
    def num_rows(self) -> int:
        return int(self.index.shape[0])

    @property
    def structure(self) -> str:
        """The structure tag the engine dispatches on (:mod:`constraint_layers._engine.tags`):
        ``"face"`` for rows with a face-local mobility (boundary rows), ``"frame"`` for rows
        that read disjoint positions (one total per frame), ``"dense"`` otherwise. Local rows
        (one per node, an operator) are :class:`~constraint_layers.local.LocalRows`, tagged
        ``"local"``."""
        if self.moves is not None:
            return "face"
        if self.index.numel() == torch.unique(self.index).numel():
            return "frame"
        return "dense"

    def dense(self, size: int) -> Tensor:
        """The dense float64 matrix ``C``: shape (M, size), or (batch, M, size) per sample."""
        lead = self.coeff.shape[:-2]
        c = torch.zeros((*lead, self.num_rows, size), dtype=F64, device=self.coeff.device)
        index = self.index.to(self.coeff.device).expand(*lead, *self.index.shape)
        return c.scatter_add_(-1, index, self.coeff.to(F64))

    def directions(self, size: int) -> Tensor:
        """The dense float64 matrix ``V`` (size, M) of the moves (column ``i``: row ``i``'s)."""
        if self.moves is None or self.weights is None:
            raise ValueError("Rows.directions: these rows carry no mobility (moves=None).")
        v = torch.zeros((self.num_rows, size), dtype=F64, device=self.weights.device)
        return v.scatter_add_(1, self.moves.to(v.device), self.weights.to(F64)).T

    def select(self, keep: Tensor) -> Rows:
        """The rows where ``keep`` (M,) bool is true."""
        keep = keep.to(self.index.device)
        pick = [None if t is None else t[..., keep, :] for t in (self.index, self.coeff)]
        return Rows(
            pick[0],
            pick[1],
            self.rhs[..., keep.to(self.rhs.device)],
            None if self.moves is None else self.moves[keep.to(self.moves.device)],
            None if self.weights is None else self.weights[keep.to(self.weights.device)],
            None if self.pivot is None else self.pivot[keep.to(self.pivot.device)],
        )

    @staticmethod
    def stack(parts: Sequence[Rows], batch: int) -> Rows:
        """The rows of several constraints as one system (mobility dropped), ``K`` padded."""
        if not parts:
            raise ValueError("Rows.stack: expected at least one set of rows, got none.")
        k = max(int(p.index.shape[1]) for p in parts)
        per_sample = any(p.coeff.ndim == 3 for p in parts)
        idx, coef, rhs = [], [], []
        for p in parts:
            pad = k - int(p.index.shape[1])
            index, coeff = p.index, p.coeff.to(F64)
            if pad:
                index = torch.cat([index, index[:, :1].expand(-1, pad)], 1)
                coeff = torch.cat([coeff, coeff.new_zeros((*coeff.shape[:-1], pad))], -1)
            if per_sample:
                coeff = coeff.expand(batch, *coeff.shape[-2:])
            idx.append(index)
            coef.append(coeff)
            rhs.append(torch.broadcast_to(p.rhs, (batch, p.num_rows)))
        return Rows(torch.cat(idx), torch.cat(coef, -2), torch.cat(rhs, -1))

    def residual(self, u: Tensor) -> Tensor:
        """``C u - d`` for ``u`` of shape (batch, N) (float64): shape (batch, M)."""
        x = u.to(F64)[:, self.index.to(u.device)]  # (batch, M, K)
        return (x * self.coeff.to(u.device)).sum(-1) - self.rhs.to(u.device)

    def relative_residual(self, u: Tensor) -> Tensor:
        """``|C u - d| / (||c||_1 max|u| + |d|)`` per row: shape (batch, M), float64.

        The residual relative to the size of the terms a row balances: what the tolerance table
        (``residual`` column) bounds after enforcement, for every family alike.
        """
        r = self.residual(u).abs()
        size = u.detach().abs().amax(-1, keepdim=True).to(F64)
        c1 = self.coeff.to(u.device).abs().sum(-1)
        return r / (c1 * size + self.rhs.to(u.device).abs() + torch.finfo(F64).tiny)


@runtime_checkable
class Constraint(Protocol):
    """What every constraint offers the engine: its family and its rows for an output shape.

    ``shape`` is the output's grid view ``(batch, channels, d1, ..., dn)`` (a flat event is one
    channel); ``grid`` says how it maps to coordinates; ``inputs`` is the model input (for values
    given as callables).
    """

    family: ClassVar[str]

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> Rows: ...
