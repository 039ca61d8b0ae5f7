"""Constraint values (boundary values, conservation totals): checks shared by both layers."""

from __future__ import annotations

import copy
import math
from numbers import Real
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Given",
    "bind_given",
    "check_finite_now",
    "check_value",
    "evaluate_value",
    "given_names",
    "shape_hint",
    "shown_value",
    "value_attrs",
]


@torch.compiler.disable
def check_finite_now(value: Tensor, where: str, what: str) -> None:
    """Raise if ``value`` holds NaN or inf. Runs eagerly under ``torch.compile`` too (a graph
    break): the checks are part of the contract, not of the debug mode."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"{where}: the {what} holds NaN or inf; expected finite values.")


def check_value(value: object, where: str, what: str, shapes: str = "") -> Any:
    """Validate a value given at construction: a finite number, a floating tensor without NaN or
    inf (tensors that require grad are checked when evaluated instead), or a callable of the
    model input; or :class:`Given` (supplied at call time). ``shapes`` completes the message of
    the TypeError."""
    if isinstance(value, Given):
        return value
    if isinstance(value, Tensor):
        if not (value.is_floating_point() or value.is_complex()):
            value = value.to(torch.get_default_dtype())
        if not value.requires_grad:
            check_finite_now(value, where, what)
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
    if isinstance(value, Given):
        raise ValueError(
            f"{where}: the {what} is {value!r}: it is supplied as a keyword argument of the "
            f"wrapped model's call (model(x, {value.name}=...)); the functional API needs the "
            "value itself."
        )
    if isinstance(value, Tensor):
        if value.requires_grad:  # learnable values are checked at each call, not at construction
            check_finite_now(value, where, what)
        return value
    if not callable(value):
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
    check_finite_now(result, where, what)
    return result


class Given:
    """A constraint value supplied at call time, as a keyword argument of the wrapped model's call.

    Per-sample data (boundary values measured with each sample, the total mass of each test
    function) usually travel with the batch, not with the model input. ``Given("name")`` declares
    that the value arrives as ``wrapped(x, name=value)``; the wrapper takes the keyword out of the
    call (the model never sees it) and uses it as the value, checked like any other. With
    neuraloperator's ``Trainer``, which calls ``model(**sample)``, a data set whose samples carry
    the key ``name`` feeds it automatically.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> model = cl.wrap(torch.nn.Conv1d(1, 1, 3, padding=1), cl.Dirichlet(cl.Given("wall")))
    >>> wall = torch.tensor([[1.0], [2.0]])  # one value per sample: shape (batch, channels)
    >>> y = model(torch.randn(2, 1, 8), wall=wall)
    >>> y[:, 0, 0].tolist(), y[:, 0, -1].tolist()
    ([1.0, 2.0], [1.0, 2.0])
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"Given: name must be a valid keyword-argument name (an identifier), got {name!r}."
            )
        self.name = name

    def __repr__(self) -> str:
        return f"Given({self.name!r})"


def shape_hint(shape: tuple[int, ...], axes: str) -> str:
    """Example value shapes for a target ``shape`` = (batch, channels, *rest), written for its
    number of dimensions: ``(batch, 1)`` per sample on a 1-D grid's face, ``(batch, 1, 1)`` with
    one more axis, and ``(K,)`` per index of the last of ``axes`` when there is one."""
    per_sample = "(batch" + ", 1" * (len(shape) - 1) + ")"
    hints = []
    if len(shape) > 2:
        hints.append(f"shape ({shape[-1]},) for one value per index of the last of the {axes}")
    hints.append(f"shape {per_sample} for one value per sample")
    hints.append(f"shape ({shape[1]},) for one value per channel" if len(shape) == 2 else "")
    return "e.g. " + ", ".join(h for h in hints if h)


def shown_value(constraint: Any, attr: str) -> Any:
    """The value of ``attr`` as messages show it: the ``Given`` it was bound from during a call
    (so that errors about the bound value name the keyword the user passed), else the value."""
    names = constraint.__dict__.get("_given_names") if hasattr(constraint, "__dict__") else None
    if names and attr in names:
        return Given(names[attr])
    return getattr(constraint, attr)


def value_attrs(constraint: Any) -> tuple[str, ...]:
    """The attribute(s) holding a constraint's value(s): ``value_attr``, a name or a tuple of
    names (``cl.Bounds`` holds two: ``("lower", "upper")``)."""
    attr = constraint.value_attr
    return (attr,) if isinstance(attr, str) else tuple(attr)


def given_names(constraints: Any) -> set[str]:
    """The keyword names of every ``Given`` value of ``constraints``."""
    return {
        getattr(c, a).name
        for c in constraints
        for a in value_attrs(c)
        if isinstance(getattr(c, a), Given)
    }


#: How messages name each constraint attribute that can hold a value.
_WHAT = {"b": "right-hand side", "lower": "lower bound", "upper": "upper bound"}


def bind_given(constraints: Any, kwargs: dict, call: str) -> Any:
    """Replace ``Given`` values of ``constraints`` (each's attribute(s) ``value_attr``) by the
    call's keyword arguments, which are removed from ``kwargs``. Returns the constraints to use
    for this call (copies where a value was bound; the originals are not changed)."""
    wanted = given_names(constraints)
    if not wanted:
        return constraints
    missing = sorted(wanted - set(kwargs))
    if missing:
        raise ValueError(
            f"{call}: the constraints take their values from the keyword argument(s) {missing} "
            f"(cl.Given), but the call passed {sorted(kwargs) or 'none'}. Call the wrapped model "
            f"as model(x, {missing[0]}=...)."
        )
    given = {name: kwargs.pop(name) for name in wanted}
    out = []
    for c in constraints:
        for attr in value_attrs(c):
            value = getattr(c, attr)
            if isinstance(value, Given):
                what = {"b": "right-hand side", "lower": "lower bound", "upper": "upper bound"}.get(
                    attr, "value"
                )
                c = copy.copy(c)
                if c.family == "bounds":  # a bound may be -inf / +inf: checked when resolved
                    bound = given[value.name]
                else:
                    bound = check_value(given[value.name], f"{call}: {c!r}", what)
                if isinstance(bound, Tensor) and bound.requires_grad and c.family != "bounds":
                    check_finite_now(bound, f"{call}: {c!r}", what)
                setattr(c, attr, bound)
                c._given_names = {**c.__dict__.get("_given_names", {}), attr: value.name}
        out.append(c)
    return type(constraints)(out) if isinstance(constraints, tuple) else out
