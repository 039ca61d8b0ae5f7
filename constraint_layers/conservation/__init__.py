"""Conservation constraints (after ProbConserv): constraints, Gaussian conditioning, mixtures."""

from __future__ import annotations

from typing import Any

from .constraint import Conservation, IntegralConservation, mass_over_time

__all__ = ["Conservation", "ConservationProjection", "IntegralConservation", "mass_over_time"]


def __getattr__(name: str) -> Any:  # the layer lives in constraint_layers.layer (no import cycle)
    if name == "ConservationProjection":
        from ..layer import ConservationProjection

        return ConservationProjection
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
