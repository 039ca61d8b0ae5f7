"""Shim (private, kept for imports of the old path): the Gaussian conditioning kernel lives in
:mod:`constraint_layers._engine.gaussian`."""

from __future__ import annotations

from .._engine.gaussian import condition_gaussian, conserve

__all__ = ["condition_gaussian", "conserve"]
