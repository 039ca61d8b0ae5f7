"""Errors raised inside the engine, reported under the user's call (private).

The engine's building blocks are public functions with their own names (``condition_gaussian``,
``enforce_conservation``, ``Conservation.rows``); when a wrapper runs them, a message that starts
with one of those names is re-headed with the wrapper's (``ConservationProjection: ...``), so
that every message names the call the user made.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["INTERNAL_CALLS", "under_call"]

#: Names of the building blocks whose messages a wrapper re-heads.
INTERNAL_CALLS = frozenset(
    {
        "conserve",
        "condition_gaussian",
        "enforce_conservation",
        "enforce_boundary",
        "boundary_rows",
        "boundary_residuals",
        "conservation_rows",
        "Conservation.rows",
        "Conservation.integral.rows",
        "Conservation.integral.weights",
        "Conservation.residual",
    }
)


@contextmanager
def under_call(call: str) -> Iterator[None]:
    """Re-head ``ValueError`` / ``TypeError`` / ``NotImplementedError`` messages of the engine's
    building blocks with ``call`` (the same exception object: its type and attributes stay)."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as e:
        if e.args and isinstance(e.args[0], str):
            head, sep, rest = e.args[0].partition(": ")
            if sep and head in INTERNAL_CALLS:
                e.args = (f"{call}: {rest}", *e.args[1:])
        raise
