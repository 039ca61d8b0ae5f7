"""Shim (private, kept for imports of the old path): the engine lives in
:mod:`constraint_layers._engine`; this module re-exports what was imported from here."""

from __future__ import annotations

from ._engine.dense import _noise_rows, dense_projection, split_families
from ._engine.dispatch import project

__all__ = ["_noise_rows", "dense_projection", "project", "split_families"]
