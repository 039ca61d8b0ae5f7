"""Constraint values (boundary values, conservation totals): checks shared by both layers."""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_value", "evaluate_value", "is_compiling"]


def is_compiling() -> bool:
    """True while torch.compile traces (data-dependent checks would break the graph)."""
    return bool(getattr(torch.compiler, "is_compiling", lambda: False)())


def _check_finite(value: Tensor, where: str, what: str) -> None:
    if is_compiling():
        return
    if not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"{where}: the {what} holds NaN or inf; expected finite values.")


def check_value(value: object, where: str, what: str, shapes: str = "") -> Any:
    """Validate a value given at construction: a finite number, a floating tensor without NaN or
    inf (tensors that require grad are checked when evaluated instead), or a callable of the
    model input. ``shapes`` completes the message of the TypeError."""
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        if not value.requires_grad:
            _check_finite(value, where, what)
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{where}: the {what} must be finite, got {value}.")
        return value
    if callable(value):
        return value
    raise TypeError(
        f"{where}: the {what} must be a number, a tensor{shapes}, or a callable of the model "
        f"input returning one; got {type(value).__name__}."
    )


def evaluate_value(value: Any, inputs: Any, where: str, what: str) -> Tensor | float:
    """A checked value: callables are evaluated on the model input and their result checked."""
    if not callable(value) or isinstance(value, Tensor):
        return value
    if inputs is None:
        raise ValueError(
            f"{where}: the {what} is a callable of the model input, but no input was given "
            "(pass inputs=)."
        )
    result = value(inputs)
    if isinstance(result, Real) and not isinstance(result, bool):
        result = float(result)
        if not math.isfinite(result):
            raise ValueError(f"{where}: the {what} callable returned {result}; expected finite.")
        return result
    if not isinstance(result, Tensor):
        raise TypeError(
            f"{where}: the {what} callable must return a number or a tensor, got "
            f"{type(result).__name__}."
        )
    _check_finite(result, where, what)
    return result
