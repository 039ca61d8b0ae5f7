"""Metrics of constraint satisfaction and accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._boundary_ops import boundary_residuals

__all__ = ["boundary_error", "relative_l2"]


def boundary_error(
    y: Tensor,
    bcs: Any,
    spacing: float | Sequence[float] | None = None,
    *,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    inputs: Any = None,
    include_overridden: bool = True,
) -> Tensor:
    """The largest absolute residual of each boundary condition on ``y``.

    Dirichlet: ``|u - value|``; Neumann: ``|du/dn - value|`` with the condition's one-sided stencil;
    Periodic: ``|u(low) - u(high)|``.

    Parameters
    ----------
    y : Tensor
        shape: (batch, channels, d1, ..., dn)
    bcs : BoundaryCondition or sequence of them
    include_overridden : bool, default True
        Count face points that a later condition on another axis takes over (corners, edges).
        With incompatible corner data the earlier condition cannot hold there; pass False to
        measure each condition where it is in charge.

    Returns
    -------
    Tensor
        shape: (n_conditions,), float64, detached.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> y = torch.zeros(1, 1, 11)
    >>> cl.metrics.boundary_error(y, [cl.Dirichlet(1.0), cl.Neumann(0.0)]).tolist()
    [1.0, 0.0]
    """
    res = boundary_residuals(
        y.detach(),
        bcs,
        spacing=spacing,
        extent=extent,
        endpoint=endpoint,
        inputs=inputs,
        include_overridden=include_overridden,
    )
    return torch.tensor(
        [max(float(r.abs().max()) if r.numel() else 0.0 for r in parts) for parts in res],
        dtype=torch.float64,
    )


def relative_l2(pred: Tensor, true: Tensor, *, reduce: bool = True) -> Tensor:
    """Relative L2 error per sample, ``||pred - true|| / ||true||`` over all but the batch axis.

    Parameters
    ----------
    pred, true : Tensor
        shape: (batch, ...)
    reduce : bool, default True
        Average over the batch.
    """
    if pred.shape != true.shape:
        raise ValueError(
            f"relative_l2: pred and true must have the same shape, got {tuple(pred.shape)} and "
            f"{tuple(true.shape)}."
        )
    diff = (pred - true).flatten(1).norm(dim=1)
    ref = true.flatten(1).norm(dim=1)
    out = diff / ref
    return out.mean() if reduce else out
