"""Shim (private, kept for imports of the old path): the engine lives in
:mod:`constraint_layers._engine`; this module re-exports what was imported from here."""

from __future__ import annotations

from ._engine.dispatch import project
from ._engine.reference import dense_projection
from ._engine.rowops import noise_per_row as _noise_rows
from ._engine.rowops import split_families

__all__ = ["_noise_rows", "dense_projection", "project", "split_families"]
