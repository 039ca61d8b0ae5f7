"""Grid conventions shared by the boundary and conservation code (private).

Grids are channel-first: ``(batch, channels, d1, ..., dn)``. A closed interval ``[0, L]`` sampled
with ``N`` nodes that include both ends has spacing ``L / (N - 1)``; a grid that leaves out the end
point (``endpoint=False``, the convention of periodic spectral grids) has spacing ``L / N``.
Spacings are recomputed from the tensor at every call, so a model evaluated at a new resolution
stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import GridError

__all__ = ["check_grid", "check_grid_options", "flat_channels", "normalize_dim", "resolve_spacing"]

Number = float | int


def check_grid(y: object, call: str) -> Tensor:
    """Return ``y`` if it is a channel-first grid tensor ``(batch, channels, d1, ..., dn)``."""
    if not isinstance(y, Tensor):
        raise TypeError(
            f"{call}: expected the model output to be a torch.Tensor of shape "
            f"(batch, channels, d1, ..., dn), got {type(y).__name__}. If your model returns a "
            "tuple or a dict, register an adapter that extracts the grid "
            "(constraint_layers.adapters.register)."
        )
    if y.ndim < 3:
        raise GridError(
            f"{call}: expected a channel-first grid of shape (batch, channels, d1, ..., dn) "
            "with at "
            f"least one spatial axis, got shape {tuple(y.shape)}. Add the missing batch or channel "
            "axis with unsqueeze."
        )
    if not (y.is_floating_point() or y.is_complex()):
        raise TypeError(f"{call}: expected a floating-point output, got dtype {y.dtype}.")
    return y


def normalize_dim(dim: int, n_spatial: int, call: str) -> int:
    """Map a spatial axis index (negative allowed) to ``0 <= dim < n_spatial``."""
    if not -n_spatial <= dim < n_spatial:
        raise GridError(
            f"{call}: dim={dim} is out of range for an output with {n_spatial} spatial axis(es) "
            f"(valid: {-n_spatial} to {n_spatial - 1}; dim counts spatial axes only, 0 is the "
            "first "
            "axis after the channels)."
        )
    return dim % n_spatial


def _per_axis(value: object, n: int, name: str, call: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() == 1:
            value = float(value)
        else:
            value = [float(v) for v in value.flatten()]
    if isinstance(value, Number) and not isinstance(value, bool):
        vals = (float(value),) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        vals = tuple(float(v) for v in value)
        if len(vals) != n:
            raise GridError(
                f"{call}: {name} must be one number or one per spatial axis ({n}), got {len(vals)} "
                f"values {vals}."
            )
    else:
        raise TypeError(
            f"{call}: {name} must be a number or a sequence of numbers, got {type(value).__name__}."
        )
    for v in vals:
        if not (math.isfinite(v) and v > 0):
            raise GridError(f"{call}: {name} must be finite and positive, got {vals}.")
    return vals


def check_grid_options(spacing: object, extent: object, call: str) -> None:
    """Validate ``spacing`` / ``extent`` before the grid is known (types, signs, exclusivity)."""
    if spacing is not None and extent is not None:
        raise ValueError(
            f"{call}: give either spacing= (fixed) or extent= (domain length, spacing follows the "
            "resolution), not both."
        )
    for name, value in (("spacing", spacing), ("extent", extent)):
        if isinstance(value, Sequence) and not isinstance(value, str):
            _per_axis(value, len(value), name, call)
        elif value is not None:
            _per_axis(value, 1, name, call)


def resolve_spacing(
    grid_shape: Sequence[int],
    *,
    spacing: object = None,
    extent: object = None,
    endpoint: bool = True,
    call: str = "constraint_layers",
) -> tuple[float, ...]:
    """Grid spacing per spatial axis.

    Parameters
    ----------
    grid_shape : sequence of int
        The spatial sizes ``(d1, ..., dn)``.
    spacing : float or sequence of float, optional
        Fixed spacing per axis. Exclusive with ``extent``.
    extent : float or sequence of float, optional
        Domain length per axis; the spacing is ``extent / (N - 1)`` (``extent / N`` when
        ``endpoint=False``) and follows the resolution of each call. Default: 1.
    endpoint : bool
        Whether the grid holds the node at the high end of each axis.
    """
    n = len(grid_shape)
    check_grid_options(spacing, extent, call)
    fixed = _per_axis(spacing, n, "spacing", call)
    if fixed is not None:
        return fixed
    lengths = _per_axis(extent, n, "extent", call) or (1.0,) * n
    out = []
    for length, size in zip(lengths, grid_shape):
        intervals = size - 1 if endpoint else size
        # an axis too short to have a spacing gets NaN: only a condition acting on it would use
        # it, and conditions check their axis length first (with a clear message)
        out.append(length / intervals if intervals >= 1 else math.nan)
    return tuple(out)


def flat_channels(channels: object, n_channels: int, call: str) -> Tensor | None:
    """Validate a channel selection against the output's channel count (None means all)."""
    if channels is None:
        return None
    idx = torch.as_tensor(channels, dtype=torch.long).flatten()
    if idx.numel() and (idx.min() < -n_channels or idx.max() >= n_channels):
        raise GridError(
            f"{call}: channels={list(map(int, idx))} out of range for an output with "
            f"{n_channels} channel(s)."
        )
    return idx % n_channels
