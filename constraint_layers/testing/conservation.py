"""The conservation flavour of the test mixin.

A concrete test class says how to build the model, the constraints and the input; the dense
float64 reference is derived from the constraints' rows (override :meth:`reference` to give a
hand-written one)::

    class TestMyHead(ConservationLayerTests):
        def make_model(self, dtype):
            return MyHead().to(dtype)

        def make_constraints(self):
            return cl.Conservation.integral(0.0)

        def make_input(self, batch, dtype):
            return torch.randn(batch, 1, 33, dtype=dtype)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..conservation.constraint import constraints_of
from ..conservation.enforce import grid_view
from .base import ConstraintLayerTests
from .reference import dense_update

__all__ = ["ConservationLayerTests", "dense_update"]


class ConservationLayerTests(ConstraintLayerTests):
    """:class:`ConstraintLayerTests` for conservation constraints (float64 by default)."""

    dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float64, torch.float32)
    #: Whether the float32 check runs (``dtypes`` without float32).
    check_float32: ClassVar[bool] = True
    dense_update = staticmethod(dense_update)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "dtypes" not in cls.__dict__:  # the main dtype, then float32 unless switched off
            extra = [torch.float32] if cls.check_float32 else []
            cls.dtypes = tuple(dict.fromkeys([cls.dtype, *extra]))

    def dense_rows(
        self, shape, x: Any = None, event_ndim: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """All constraints' rows for an output mean of ``shape``: ``(G, b)`` of shapes
        (M, N) or (batch, M, N), and (batch, M)."""
        shape = tuple(shape)
        grid = grid_view(
            torch.empty(shape, device="meta"),
            event_ndim if event_ndim is not None else max(len(shape) - 1, 1),
            self.options().get("grid_shape"),
            "dense_rows",
        )
        n = math.prod(grid[1:])
        Gs, bs = [], []
        for c in constraints_of(self.make_constraints(), "dense_rows"):
            r = c.rows(grid, inputs=x)
            Gs.append(r.dense(n))
            bs.append(r.rhs)
        if any(g.ndim == 3 for g in Gs):
            Gs = [g if g.ndim == 3 else g.expand(grid[0], *g.shape) for g in Gs]
        return torch.cat(Gs, -2), torch.cat(bs, -1)
