"""Named exceptions of constraint-layers.

Every exception raised for bad input is a ``ValueError`` or a ``TypeError`` (or a subclass of one)
whose message names the call, what was expected, what was received and how to fix it. The few
classes below exist so that callers can catch the situations they may want to handle.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConditioningWarning",
    "ConstraintError",
    "ConstraintViolationError",
    "GridError",
    "IncompatibleConstraintsError",
    "IndefiniteCovarianceWarning",
    "NoAdapterError",
    "SingularConstraintError",
]


class ConstraintError(ValueError):
    """Base class of the value errors specific to constraint-layers."""


class GridError(ConstraintError):
    """A model output is not the channel-first grid a constraint needs, or the grid is too short."""


class SingularConstraintError(ConstraintError):
    """A constraint system cannot be solved (e.g. a conservation row that sees zero variance)."""


class IncompatibleConstraintsError(SingularConstraintError):
    """Constraints that cannot hold together (e.g. a total that the wall values make impossible).

    The message names the constraints and rows involved; ``rows`` holds their indices in the
    stacked system (in the order the constraints were given).
    """

    def __init__(self, message: str, rows: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.rows = rows


class ConstraintViolationError(ConstraintError):
    """Raised in debug mode when a corrected output does not satisfy its constraint."""


class CheckpointError(ConstraintError):
    """A checkpoint that cannot be loaded as it is: a damaged or foreign sidecar file, a sidecar
    that belongs to other weights, or a pickle that is not read without the user's say-so. The
    message names the file(s)."""


class NoAdapterError(TypeError):
    """No registered adapter knows how to wrap a model of this type."""


class ConditioningWarning(UserWarning):
    """A constraint system that can be solved but only by a move far larger than the model's
    output (nearly dependent rows with conflicting totals)."""


class IndefiniteCovarianceWarning(UserWarning):
    """The model's covariance is indefinite beyond rounding (an inaccurate float32 or CG
    posterior); the conditioning went on as gpytorch does (a diagonal jitter, or negative
    variances clamped to 0). Turn it into an error with
    ``warnings.filterwarnings("error", category=IndefiniteCovarianceWarning)``."""
