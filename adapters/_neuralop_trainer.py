"""A wrapper called by neuraloperator's ``Trainer`` without ``normalizer=`` (private).

The ``Trainer`` feeds the model normalised data and un-normalises its output afterwards
(``data_processor.postprocess``) when the data processor has an output normaliser. A wrapper
without ``normalizer=`` then enforces its constraints in normalised units: Dirichlet walls land
on the training mean in physical units, and the library's own metrics (which see the wrapper's
output) report them exact. :func:`check_trainer_normalizer` refuses that call.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

__all__ = ["NormalisedUnits", "check_trainer_normalizer"]

_DEPTH = 8  # frames between the pre-hook and the Trainer's method (module __call__ machinery)


class NormalisedUnits:
    """``normalizer=NormalisedUnits()``: the constraints are stated in the normalised units the
    model is trained in, deliberately (the identity; neuraloperator's ``Trainer`` then
    un-normalises the constrained output).

    Examples
    --------
    >>> import torch
    >>> NormalisedUnits().inverse_transform(torch.ones(2)).tolist()
    [1.0, 1.0]
    """

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse_transform(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __repr__(self) -> str:
        return "NormalisedUnits()"


def _calling_trainer() -> Any:
    frame = sys._getframe(2)
    for _ in range(_DEPTH):
        if frame is None:
            return None
        if "neuralop" in frame.f_code.co_filename and "training" in frame.f_code.co_filename:
            owner = frame.f_locals.get("self")
            if owner is not None and hasattr(owner, "data_processor"):
                return owner
        frame = frame.f_back
    return None


def check_channels_first(wrapper: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise for a channel-last input ``(batch, d1, ..., dn, channels)``, which neuraloperator
    models do not take (they would fail deep inside, or in refine mode inside the refinement)."""
    if getattr(wrapper, "layout", "grid") == "points":
        return  # point-cloud models (GINO, FNOGNO) take channel-last features by design
    x = args[0] if args else kwargs.get("x")
    model = wrapper.__dict__.get("_modules", {}).get("model")
    c = getattr(model, "in_channels", None)
    if not isinstance(x, torch.Tensor) or not isinstance(c, int) or x.ndim < 3 or x.shape[1] == c:
        return
    if x.shape[-1] == c:
        mode = getattr(wrapper, "mode", "output")
        raise ValueError(
            f"{type(wrapper).__name__}(mode={mode!r}): the input has shape {tuple(x.shape)}, "
            f"with the model's {c} input channel(s) last; {type(model).__name__} takes "
            "channel-first input (batch, channels, d1, ..., dn). Move the channels: "
            "x.movedim(-1, 1)."
        )


def check_trainer_normalizer(wrapper: nn.Module, args: tuple, kwargs: dict | None = None) -> None:
    """Forward pre-hook: raise when neuraloperator's ``Trainer`` calls a wrapper that has no
    ``normalizer=`` while its data processor normalises the outputs (and, first, for a
    channel-last input)."""
    if torch.compiler.is_compiling():
        return
    check_channels_first(wrapper, args, kwargs or {})
    if getattr(wrapper, "normalizer", None) is not None:
        return
    trainer = _calling_trainer()
    processor = getattr(trainer, "data_processor", None)
    out_normalizer = getattr(processor, "out_normalizer", None)
    if out_normalizer is None:
        return
    call = type(wrapper).__name__
    raise ValueError(
        f"{call}: called by neuraloperator's Trainer, whose data_processor "
        f"({type(processor).__name__}) un-normalises the model's output with its out_normalizer "
        f"({type(out_normalizer).__name__}), but the wrapper was given no normalizer=: its "
        "constraints would hold in normalised units, not in the physical units the Trainer "
        "reports (Dirichlet walls would land on the training mean). Pass the data processor: "
        "cl.wrap(model, ..., normalizer=data_processor); or, to state the constraints in "
        "normalised units deliberately, normalizer=NormalisedUnits() (from "
        "constraint_layers.adapters.neuralop import NormalisedUnits)."
    )
