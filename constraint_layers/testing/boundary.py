"""The boundary flavour of the test mixin: the vocabulary of the first release.

Example
-------
>>> import torch, constraint_layers as cl
>>> from constraint_layers.testing import BoundaryLayerChecks
>>> class TestMyConv(BoundaryLayerChecks):          # collected by pytest (name starts with Test)
...     def make_model(self, dtype):
...         return torch.nn.Conv1d(2, 1, 5, padding=2).to(dtype)
...     def make_input(self, batch, dtype):
...         return torch.randn(batch, 2, 40, dtype=dtype)
...     def conditions(self):
...         return [cl.Dirichlet(1.0, side="low"), cl.Neumann(0.5, side="high", order=3)]
>>> TestMyConv().test_matches_reference()
"""

from __future__ import annotations

from typing import Any

from .base import ConstraintLayerTests

__all__ = ["BoundaryLayerChecks"]


class BoundaryLayerChecks(ConstraintLayerTests):
    """:class:`ConstraintLayerTests` for boundary conditions: define ``make_model(dtype)``,
    ``make_input(batch, dtype)`` and ``conditions()``; optionally ``options()`` (keyword options
    of ``cl.wrap``, e.g. ``spacing``, ``lift``). The dense reference follows the conditions' rows
    and directions (with lift too)."""

    def conditions(self) -> list[Any]:
        raise NotImplementedError

    def make_constraints(self) -> list[Any]:
        return list(self.conditions())
