"""Argument checks shared by the problem suite (private).

Every check names the call, what was expected and what was received, and raises ``TypeError`` for
wrong types and ``ValueError`` for wrong values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

import torch
from torch import Tensor

__all__ = [
    "as_float64",
    "check_choice",
    "check_dtype",
    "check_float",
    "check_int",
    "check_interval",
    "check_times",
    "make_generator",
    "out_dtype",
]


def check_int(value: object, name: str, call: str, *, minimum: int = 1) -> int:
    """An ``int`` (not a bool) that is at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{call}: {name} must be an int, got {type(value).__name__} ({value!r}).")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{call}: {name} must be >= {minimum}, got {value}.")
    return value


def check_float(
    value: object,
    name: str,
    call: str,
    *,
    positive: bool = False,
    nonnegative: bool = False,
) -> float:
    """A finite real number, optionally > 0 or >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{call}: {name} must be a real number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{call}: {name} must be finite, got {value}.")
    if positive and value <= 0:
        raise ValueError(f"{call}: {name} must be > 0, got {value}.")
    if nonnegative and value < 0:
        raise ValueError(f"{call}: {name} must be >= 0, got {value}.")
    return value


def check_interval(
    value: object, name: str, call: str, *, positive: bool = False
) -> tuple[float, float]:
    """A pair ``(low, high)`` of finite numbers with ``low <= high``."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise TypeError(f"{call}: {name} must be a pair (low, high), got {value!r}.")
    lo = check_float(value[0], f"{name}[0]", call, positive=positive)
    hi = check_float(value[1], f"{name}[1]", call, positive=positive)
    if lo > hi:
        raise ValueError(f"{call}: {name} must satisfy low <= high, got ({lo}, {hi}).")
    return lo, hi


def check_choice(value: object, choices: Sequence[str], name: str, call: str) -> str:
    """One of a few strings."""
    if value not in choices:
        raise ValueError(f"{call}: {name} must be one of {tuple(choices)}, got {value!r}.")
    return str(value)


def check_dtype(dtype: object, call: str) -> torch.dtype:
    """A floating-point torch dtype; ``None`` means the default dtype."""
    if dtype is None:
        return torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype):
        raise TypeError(
            f"{call}: dtype must be a torch.dtype (e.g. torch.float32), got {type(dtype).__name__}."
        )
    if not dtype.is_floating_point:
        raise ValueError(f"{call}: dtype must be a floating-point dtype, got {dtype}.")
    return dtype


def make_generator(seed: object, call: str) -> torch.Generator:
    """A CPU generator from an int seed (or the generator itself)."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(
            f"{call}: seed must be an int or a torch.Generator, got {type(seed).__name__}."
        )
    if seed < 0:
        raise ValueError(f"{call}: seed must be >= 0, got {seed}.")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    return gen


def as_float64(value: object, name: str, call: str) -> Tensor:
    """A finite float64 CPU tensor from a number, a sequence or a tensor."""
    if isinstance(value, Tensor):
        if value.is_complex():
            raise TypeError(f"{call}: {name} must be real, got dtype {value.dtype}.")
        out = value.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(value, bool):
        raise TypeError(f"{call}: {name} must be a number or a tensor, got bool.")
    elif isinstance(value, Real):
        out = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        try:
            out = torch.as_tensor(value, dtype=torch.float64)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{call}: {name} must be a number, a sequence of numbers or a tensor; "
                f"got {value!r}."
            ) from exc
    else:
        raise TypeError(
            f"{call}: {name} must be a number, a sequence of numbers or a tensor, got "
            f"{type(value).__name__}."
        )
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{call}: {name} holds NaN or inf; expected finite values.")
    return out


def out_dtype(*values: object) -> torch.dtype:
    """The floating dtype of the tensors among ``values`` (promoted), else the default dtype."""
    dtypes = [v.dtype for v in values if isinstance(v, Tensor) and v.is_floating_point()]
    if not dtypes:
        return torch.get_default_dtype()
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def check_times(
    times: object, call: str, *, t_max: float | None = None, allow_zero: bool = False
) -> Tensor:
    """A 1-D, strictly increasing, float64 tensor of times (> 0, or >= 0 with ``allow_zero``)."""
    t = as_float64(times, "times", call).reshape(-1) if times is not None else None
    if t is None or t.numel() == 0:
        raise ValueError(f"{call}: times must hold at least one time, got {times!r}.")
    if (t[1:] <= t[:-1]).any():
        raise ValueError(f"{call}: times must be strictly increasing, got {t.tolist()}.")
    lowest = float(t[0])
    if lowest < 0 or (lowest == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{call}: times must be {bound}, got a first time of {lowest}.")
    if t_max is not None and float(t[-1]) > t_max * (1 + 1e-12):
        raise ValueError(f"{call}: times must not exceed {t_max}, got {float(t[-1])}.")
    return t
