"""Conditioning a model output on conservation constraints (private; public names in
``functional``): the grid view of an output, the per-frame fast path of integral constraints, and
the stacked general path through :func:`~constraint_layers.functional.condition_gaussian`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._values import check_finite_now
from ..conservation.constraint import Conservation, constraints_of
from ..conservation.gaussian import Gaussian
from ..conservation.posterior import ConstrainedGaussian
from ..errors import GridError
from .gaussian import condition_gaussian
from .tags import structure_of

__all__ = [
    "METRICS",
    "condition",
    "enforce_conservation",
    "flat_event",
    "grid_view",
    "stacked_posterior",
]

METRICS = ("covariance", "euclidean")


def flat_event(x: Tensor | None, event_ndim: int) -> Tensor | None:
    return None if x is None else x.reshape(*x.shape[: x.ndim - event_ndim], -1)


def grid_view(mean: Tensor, event_ndim: int, grid_shape, call: str) -> tuple[int, ...]:
    """The (batch, channels, d1, ..., dn) shape the constraint rows are stated on."""
    k = event_ndim
    if not 1 <= k <= mean.ndim:
        raise ValueError(
            f"{call}: event_ndim must be between 1 and mean.ndim = {mean.ndim}, got {k}."
        )
    batch = math.prod(mean.shape[: mean.ndim - k])
    event = tuple(mean.shape[mean.ndim - k :])
    if k == 1:
        n = event[0]
        grid = tuple(grid_shape) if grid_shape is not None else (n,)
        if math.prod(grid) != n:
            raise GridError(
                f"{call}: grid_shape={grid} holds {math.prod(grid)} points, but the output has "
                f"{n} per sample."
            )
        return (batch, 1, *grid)
    if grid_shape is not None and len(event) == 2 and math.prod(grid_shape) == event[1]:
        return (batch, event[0], *grid_shape)  # channels of flat points (multitask GPs)
    if grid_shape is not None and tuple(grid_shape) != event[1:]:
        raise GridError(
            f"{call}: grid_shape={tuple(grid_shape)} does not match the output's grid "
            f"{event[1:]} (event shape {event} = (channels, d1, ..., dn))."
        )
    return (batch, *event)


def enforce_conservation(
    mean: Tensor,
    constraints: Conservation | Sequence[Conservation],
    *,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
    event_ndim: int | None = None,
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
) -> Gaussian:
    """Make a (Gaussian or deterministic) model output satisfy conservation constraints.

    The functional behind :class:`.ConservationProjection`: the constraints' rows are stated on
    the output's layout and :func:`~constraint_layers.functional.condition_gaussian` conditions the
    Gaussian on them (or projects a deterministic output orthogonally). A single integral
    constraint on a diagonal (or no) covariance runs as independent single-row updates, one per
    frame (O(N) time and memory).

    Parameters
    ----------
    mean : Tensor
        shape: (*batch, *event). Grid outputs: event = (channels, d1, ..., dn). Flat outputs
        (``event_ndim=1``): event = (N,), read as one channel on ``grid_shape``.
    constraints : Conservation or sequence of them
        Enforced jointly.
    variance : Tensor, optional
        shape: like ``mean`` (broadcastable). Marginal variances (the diagonal part when
        ``low_rank`` is given).
    covariance : Tensor or linear operator, optional
        shape: (*batch, N, N) over the flattened event.
    low_rank : Tensor, optional
        shape: (*batch, N, K).
    noise, metric
        As for :func:`~constraint_layers.functional.condition_gaussian`.
    event_ndim : int, optional
        Number of trailing event axes (default: all but the first axis, i.e. a (batch, ...)
        output).
    grid_shape : sequence of int, optional
        The grid of a flat event (``event_ndim=1``).
    inputs : any, optional
        The model input, passed to callable right-hand sides.

    Returns
    -------
    Gaussian
        ``mean`` and ``variance`` (marginal) in the input's layout and dtype; with a full
        ``covariance``, ``downdate`` ``F`` (shape (*batch, N, M)): the posterior covariance is
        ``covariance - F F^T``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> c = cl.Conservation.integral(0.0, dim=0)  # a (batch, 1, x, t) output, zero mass per t
    >>> out = cl.functional.enforce_conservation(torch.randn(2, 1, 33, 5), c)
    >>> float(cl.metrics.conservation_error(out.mean, c).abs().max()) < 1e-6
    True
    """
    call = "enforce_conservation"
    cons = constraints_of(constraints, call)
    if metric not in METRICS:
        raise ValueError(f"{call}: metric must be one of {METRICS}, got {metric!r}.")
    if not isinstance(mean, Tensor):
        raise TypeError(f"{call}: mean must be a tensor, got {type(mean).__name__}.")
    check_finite_now(mean, call, "mean")
    return condition(
        mean, cons, variance=variance, covariance=covariance, low_rank=low_rank, noise=noise,
        metric=metric, event_ndim=event_ndim, grid_shape=grid_shape, inputs=inputs, call=call,
    )  # fmt: skip


def condition(
    mean: Tensor,
    cons: Sequence[Conservation],
    *,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
    event_ndim: int | None = None,
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    call: str = "enforce_conservation",
) -> Gaussian:
    """:func:`enforce_conservation` after its argument checks (the engine's entry: the layer has
    already checked the model's output once)."""
    k = max(mean.ndim - 1, 1) if event_ndim is None else int(event_ndim)
    shape = grid_view(mean, k, grid_shape, call)
    lead = mean.shape[: mean.ndim - k]
    if math.prod(lead) == 0:  # an empty batch: nothing to condition
        return Gaussian(mean, variance, covariance, low_rank, None, k)
    if variance is not None and isinstance(variance, Tensor) and variance.shape != mean.shape:
        try:
            variance = torch.broadcast_to(variance, mean.shape)
        except RuntimeError:
            raise ValueError(
                f"{call}: variance of shape {tuple(variance.shape)} does not broadcast to the "
                f"mean's shape {tuple(mean.shape)}."
            ) from None
    structured = covariance is None and low_rank is None
    if len(cons) == 1 and structure_of(cons[0]) == "frame" and structured:
        return _enforce_integral(mean, variance, cons[0], shape, k, noise, metric, inputs, call)
    post = stacked_posterior(
        mean, variance, covariance, low_rank, cons, shape, lead, k, noise, metric, inputs
    )
    ev = mean.shape[mean.ndim - k :]
    var = None if post.variance is None else post.variance.reshape(*lead, *ev)
    down = None
    if covariance is not None and post.factor is not None:
        down = post.factor.to(post.mean.dtype)
    cov = post.used_covariance(covariance)  # jittered or symmetrised by the PSD policy
    return Gaussian(post.mean.reshape(*lead, *ev), var, cov, None, down, k, post)


def stacked_posterior(
    mean, variance, covariance, low_rank, cons, shape, lead, k, noise, metric, inputs
) -> ConstrainedGaussian:
    """The general path: every constraint's rows stacked, one ``condition_gaussian`` call."""
    n = math.prod(shape[1:])
    Gs, bs = [], []
    for con in cons:
        r = con.rows(shape, inputs=inputs)
        Gs.append(r.dense(n))
        bs.append(r.rhs)
    per_sample = any(x.ndim == 3 for x in Gs)
    if per_sample:
        Gs = [x if x.ndim == 3 else x.expand(shape[0], *x.shape) for x in Gs]
    G = torch.cat(Gs, dim=-2).to(mean.device)
    b = torch.cat(bs, dim=-1).to(mean.device)
    if per_sample:
        G = G.reshape(*lead, *G.shape[-2:])
    b = b.reshape(*lead, b.shape[-1])
    return condition_gaussian(
        flat_event(mean, k),
        G,
        b,
        variance=flat_event(variance, k),
        covariance=covariance,
        low_rank=low_rank,
        noise=noise,
        metric=metric,
    )


def _enforce_integral(mean, variance, con, shape, k, noise, metric, inputs, call) -> Gaussian:
    """Integral rows on a diagonal (or no) covariance: independent single-row updates."""
    lay = con.layout(shape, call)
    grid = mean.reshape(shape)
    var_grid = None if variance is None else variance.reshape(shape)
    w = con.weights(lay.sizes, device=mean.device).reshape(1, -1)
    total = con._totals(lay, inputs, call).to(mean.device).unsqueeze(-1)
    post = condition_gaussian(
        lay.to_rows(grid),
        w,
        total,
        variance=None if var_grid is None else lay.to_rows(var_grid),
        noise=noise,
        metric=metric,
    )
    new_mean = lay.from_rows(post.mean, grid).reshape(mean.shape)
    new_var = None
    if var_grid is not None:
        new_var = lay.from_rows(post.variance, var_grid).reshape(mean.shape)
    return Gaussian(new_mean, new_var, None, None, None, k)
