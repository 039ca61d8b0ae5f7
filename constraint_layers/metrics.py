"""Metrics of constraint satisfaction and accuracy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._engine.faces import boundary_residuals
from ._grid import check_grid

__all__ = [
    "boundary_error",
    "conservation_error",
    "gaussian_log_likelihood",
    "mse",
    "relative_l2",
    "shock_position",
]


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
    check_grid(y, "boundary_error")
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


# ----------------------------------------------------------------------------- conservation
def conservation_error(
    u: Tensor,
    constraint: Any,
    b: float | Tensor | None = None,
    *,
    inputs: Any = None,
) -> Tensor:
    """Signed conservation error ``G u - b`` (CE) per sample and constraint row.

    Parameters
    ----------
    u : Tensor
        A grid output (batch, channels, d1, ..., dn) for :class:`~constraint_layers.Conservation`
        constraints (a flat (batch, N) output for the general ``Conservation(G, b)``); or
        shape (*batch, N) with a matrix ``G``.
    constraint : Conservation, sequence of them, or Tensor
        The constraint(s), or a matrix ``G`` of shape (M, N) / (*batch, M, N) (then give ``b``).
    b : float or Tensor, optional
        The right-hand side when ``constraint`` is a matrix; shape (*batch, M); default 0.
    inputs : any, optional
        The model input, for callable right-hand sides.

    Returns
    -------
    Tensor
        shape: (batch, M) (rows of several constraints concatenated), or (*batch, M) for a
        matrix; float64, detached. The paper's CE at one time: the frame's entry.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> u = torch.ones(2, 1, 11, dtype=torch.float64)  # integral over [0, 1] is 1
    >>> cl.metrics.conservation_error(u, cl.Conservation.integral(0.25)).tolist()
    [[0.75], [0.75]]
    >>> cl.metrics.conservation_error(torch.ones(3), torch.ones(1, 3), 2.0).tolist()
    [1.0]
    """
    from .conservation import Conservation

    u = u.detach()
    if isinstance(constraint, Tensor):
        G = constraint.detach().to(torch.float64)
        if G.ndim == 1:
            G = G.unsqueeze(0)
        if G.shape[-1] != u.shape[-1]:
            raise ValueError(
                f"conservation_error: G has {G.shape[-1]} columns but u has {u.shape[-1]} values "
                "in its last axis."
            )
        x = u.to(torch.float64)
        res = x @ G.mT if G.ndim == 2 else (G @ x.unsqueeze(-1)).squeeze(-1)
        rhs = 0.0 if b is None else torch.as_tensor(b, dtype=torch.float64, device=res.device)
        return res - rhs
    if b is not None:
        raise ValueError(
            "conservation_error: b= is only for a matrix G; a Conservation carries its own "
            "right-hand side."
        )
    if isinstance(constraint, Conservation):
        items = [constraint]
    elif isinstance(constraint, list | tuple) and all(
        isinstance(c, Conservation) for c in constraint
    ):
        items = list(constraint)
    else:
        raise TypeError(
            "conservation_error: expected a cl.Conservation (or a list of them), or a matrix G "
            f"with b=; got {type(constraint).__name__}. For a known total use "
            "cl.Conservation.integral(total)."
        )
    return torch.cat([c.residual(u, inputs=inputs).detach() for c in items], dim=-1)


def _dims(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...] | None:
    if dim is None:
        return None
    return (dim,) if isinstance(dim, int) else tuple(dim)


def mse(pred: Tensor, true: Tensor, *, dim: int | Sequence[int] | None = -1) -> Tensor:
    """Mean squared error over ``dim`` (default: the last axis), batched over the rest.

    Parameters
    ----------
    pred, true : Tensor
        Broadcastable shapes.
    dim : int, sequence of int or None
        Axes averaged over (None: all).

    Returns
    -------
    Tensor
        The remaining axes; float64, detached.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> cl.metrics.mse(torch.zeros(2, 4), torch.ones(2, 4)).tolist()
    [1.0, 1.0]
    """
    d = (pred.detach().to(torch.float64) - true.detach().to(torch.float64)).square()
    dims = _dims(dim, d.ndim)
    return d.mean() if dims is None else d.mean(dim=dims)


def gaussian_log_likelihood(
    true: Tensor,
    mean: Tensor,
    variance: Tensor,
    *,
    dim: int | Sequence[int] | None = -1,
    min_variance: float = 0.0,
) -> Tensor:
    """Mean Gaussian log density of ``true`` under ``N(mean, variance)`` (marginals only).

    ``LL = mean over dim of -0.5 * (log(2 pi var) + (true - mean)^2 / var)`` (the paper's LL).

    Parameters
    ----------
    true, mean, variance : Tensor
        Broadcastable shapes; ``variance`` are variances (not standard deviations).
    dim : int, sequence of int or None
        Axes averaged over (default: the last; None: all).
    min_variance : float, default 0.0
        Floor applied to the variances (the published implementation floors at 1e-8). Without a
        floor a zero variance raises.

    Returns
    -------
    Tensor
        The remaining axes; float64, detached.

    Raises
    ------
    ValueError
        A variance is NaN, negative, or zero (after the floor).

    Examples
    --------
    >>> import math, torch, constraint_layers as cl
    >>> ll = cl.metrics.gaussian_log_likelihood(torch.zeros(3), torch.zeros(3), torch.ones(3))
    >>> round(float(ll), 6) == round(-0.5 * math.log(2 * math.pi), 6)
    True
    """
    var = variance.detach().to(torch.float64)
    if min_variance > 0:
        var = var.clamp_min(min_variance)
    low = float(var.amin()) if var.numel() else 1.0
    if not low > 0:
        raise ValueError(
            "gaussian_log_likelihood: variances must be positive and finite, got a minimum of "
            f"{low}. Pass min_variance= (e.g. 1e-8) to floor them."
        )
    r = true.detach().to(torch.float64) - mean.detach().to(torch.float64)
    ll = -0.5 * (torch.log(2 * math.pi * var) + r.square() / var)
    dims = _dims(dim, ll.ndim)
    return ll.mean() if dims is None else ll.mean(dim=dims)


def shock_position(
    samples: Tensor,
    grid: Tensor | None = None,
    *,
    dim: int = -1,
    threshold: float = 0.0,
) -> Tensor:
    """Position of the first grid point where each sample drops to ``<= threshold``.

    The shock (front) position of a sample profile, e.g. of posterior samples of the Stefan
    problem: ``x_i`` for the smallest ``i`` with ``u_i <= threshold``, read from the grid (not
    ``i / N``).

    Parameters
    ----------
    samples : Tensor
        shape: (..., N, ...), profiles along ``dim``.
    grid : Tensor, optional
        shape: (N,); the node positions. Default: ``linspace(0, 1, N)`` (nodes at both ends).
    dim : int, default -1
    threshold : float, default 0.0

    Returns
    -------
    Tensor
        ``samples``' shape without ``dim``, float64; NaN where a sample never drops to the
        threshold.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> u = torch.tensor([[1.0, 0.5, 0.0, 0.0, 0.0], [1.0, 0.9, 0.8, 0.1, -0.1]])
    >>> cl.metrics.shock_position(u).tolist()
    [0.5, 1.0]
    """
    x = samples.detach().movedim(dim, -1)
    n = x.shape[-1]
    if grid is None:
        grid = torch.linspace(0, 1, n, dtype=torch.float64, device=x.device)
    grid = torch.as_tensor(grid, dtype=torch.float64, device=x.device)
    if grid.shape != (n,):
        raise ValueError(
            f"shock_position: grid must have shape ({n},) (one position per point along "
            f"dim={dim}), got {tuple(grid.shape)}."
        )
    below = x <= threshold
    first = below.to(torch.int8).argmax(-1)
    pos = grid[first]
    return torch.where(below.any(-1), pos, torch.full_like(pos, math.nan))
