"""The joint entry: any mix of constraints on one output, as a pure function (private; public as
``cl.functional.project``).

:func:`project_prediction` is the path every call takes, the layer's included: check the
prediction (finite, variances non-negative, real for conservation rows), hand it to the engine's
dispatcher (:mod:`constraint_layers._engine.dispatch`, which picks the solver by the rows'
structure tags), check that the result is finite. :func:`project` checks its arguments as
``cl.wrap`` does, binds the grid and the ``cl.Given`` values, and returns a tensor (deterministic
output) or the library's Gaussian record.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from ._bind_grid import bind_grid
from ._engine.dispatch import project as dispatch
from ._engine.faces import check_lift
from ._engine.rowops import split_families
from ._engine.streaming import grid_view
from ._grid import check_grid_options
from ._layer_checks import (
    check_constraints,
    check_flat_grid,
    check_metric,
    check_noise,
    check_prediction,
    check_rows,
    resolve_layout,
)
from ._messages import under_call
from ._values import bind_given, check_finite_now, given_names
from .conservation.gaussian import Gaussian
from .rows import DEFAULT_GRID, GridSpec

__all__ = [
    "check_posterior",
    "check_record",
    "project",
    "project_prediction",
    "structured_posterior",
]


def check_record(pred: Gaussian, constraints: Sequence[Any], call: str) -> bool:
    """Check a prediction record (finite, variances non-negative, real for conservation rows);
    returns False for an empty batch (nothing to constrain)."""
    check_prediction(pred, call)
    if pred.mean.is_complex() and any(c.family == "conservation" for c in constraints):
        raise TypeError(
            f"{call}: conservation constraints act on real outputs, but the model's output is "
            f"complex ({pred.mean.dtype}). Constrain the real and imaginary parts as two "
            "channels (torch.view_as_real), or use boundary conditions only."
        )
    return math.prod(pred.mean.shape[: pred.mean.ndim - pred.event_ndim]) != 0


def project_prediction(
    pred: Gaussian,
    constraints: Sequence[Any],
    *,
    layout: str = "grid",
    grid: GridSpec = DEFAULT_GRID,
    lift: int = 0,
    noise: Any = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
    call: str = "project",
    checked: bool = False,
) -> Gaussian:
    """Enforce checked ``constraints`` on one prediction record in physical units; returns the
    record of the constrained prediction (same layout and dtype). ``checked``: the record passed
    :func:`check_record` already (the layer checks it before the normaliser)."""
    if not checked and not check_record(pred, constraints, call):
        return pred  # an empty batch: nothing to constrain
    with under_call(call):  # the dispatcher picks the solver by the rows' structure tags
        post = dispatch(
            pred, constraints, layout=layout, grid=grid, lift=lift, noise=noise, metric=metric,
            grid_shape=grid_shape, inputs=inputs, call=call,
        )  # fmt: skip
    check_finite_now(post.mean, call, "constrained output (the projection overflowed the "
                     f"output dtype {post.mean.dtype}; use a wider dtype)")  # fmt: skip
    return post


def project(
    u: Tensor,
    *constraints: Any,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    grid: GridSpec | None = None,
    spacing: float | Sequence[float] | None = None,
    extent: float | Sequence[float] | None = None,
    endpoint: bool = True,
    lift: int = 0,
    noise: float | Tensor | Sequence[float] = 0.0,
    metric: str = "covariance",
    grid_shape: Sequence[int] | None = None,
    layout: str = "auto",
    event_ndim: int | None = None,
    inputs: Any = None,
    debug: bool = False,
    **given: Any,
) -> Tensor | Gaussian:
    """Make one output satisfy any mix of constraints exactly: the step ``cl.wrap`` adds.

    The same path as a wrapper's call (:class:`~constraint_layers.ConstraintLayer`), without a
    model: boundary conditions, conservation rows, bounds, local rows (``cl.DivergenceFree``,
    ...) and point-cloud constraints, jointly; the engine picks the solver by the rows'
    structure. A deterministic output is projected (Euclidean); a Gaussian one (``variance``,
    ``covariance`` or ``low_rank`` given) is conditioned (``metric="covariance"``, ProbConserv)
    or its mean projected (``metric="euclidean"``).

    Parameters
    ----------
    u : Tensor
        shape: (batch, channels, d1, ..., dn) for a grid; (batch, n_points, channels) for a point
        cloud; (*batch, N) with ``event_ndim=1`` and ``grid_shape`` for a flat output. The mean
        of a Gaussian output. Not modified.
    *constraints
        The constraints (``cl.Dirichlet``, ``cl.Neumann``, ``cl.Periodic``, ``cl.Conservation``,
        ``cl.Bounds``, ``cl.DivergenceFree``, ...), or one sequence of them.
    variance : Tensor, optional
        shape: like ``u`` (broadcastable). Marginal variances (the diagonal part with
        ``low_rank``).
    covariance : Tensor or linear operator, optional
        shape: (*batch, N, N) over the flattened event.
    low_rank : Tensor, optional
        shape: (*batch, N, K).
    grid : GridSpec, optional
        The grid at once (:class:`~constraint_layers.rows.GridSpec`: spacing, extent, endpoint),
        e.g. a wrapper's ``.grid``; or give them one by one.
    spacing, extent, endpoint, lift
        The grid, as for ``cl.wrap`` (the grid of every constraint: a conflict raises).
    noise, metric, grid_shape, layout
        As for ``cl.wrap``.
    event_ndim : int, optional
        Number of trailing event axes; default all but the first (a (batch, ...) output).
    inputs : any, optional
        The model input, passed to values given as callables.
    debug : bool, default False
        Check every row's residual after the projection (as ``cl.wrap(..., debug=True)``).
    **given
        Values of ``cl.Given`` constraints, by name.

    Returns
    -------
    Tensor or Gaussian
        A deterministic output: the constrained tensor (shape and dtype of ``u``). A Gaussian
        output: :class:`~constraint_layers.functional.Gaussian` (``mean``, ``variance``, and for
        a full covariance the ``downdate``), as the layer hands it to adapters.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> u = torch.randn(4, 1, 65, dtype=torch.float64)
    >>> heat = cl.Conservation.integral(1.0)
    >>> y = cl.functional.project(u, cl.Neumann(0.0), heat)   # insulated walls, total 1
    >>> bool(cl.metrics.conservation_error(y, heat).abs().max() < 1e-12)
    True
    >>> g = cl.functional.project(u, heat, variance=torch.ones_like(u))
    >>> type(g).__name__, tuple(g.variance.shape)
    ('Gaussian', (4, 1, 65))
    """
    call = "project"
    if not isinstance(u, Tensor):
        raise TypeError(f"{call}: u must be a tensor (the output to constrain), got "
                        f"{type(u).__name__}.")  # fmt: skip
    if grid is not None:
        if not isinstance(grid, GridSpec):
            raise TypeError(
                f"{call}: grid must be a constraint_layers.rows.GridSpec(spacing, extent, "
                f"endpoint), got {type(grid).__name__}; or give spacing=, extent=, endpoint=."
            )
        if spacing is not None or extent is not None or endpoint is not True:
            raise ValueError(
                f"{call}: give the grid either as grid=GridSpec(...) or by spacing=, extent=, "
                "endpoint=, not both."
            )
        spacing, extent, endpoint = grid
    if len(constraints) == 1 and isinstance(constraints[0], (list, tuple)):
        constraints = tuple(constraints[0])
    items = check_constraints(constraints, call)
    layout = resolve_layout(layout, None, None, items, call)
    check_grid_options(spacing, extent, call)
    items = bind_grid(items, spacing, extent, bool(endpoint), call)
    left, names = dict(given), sorted(given_names(items))
    items = bind_given(items, left, call)
    if left:
        raise TypeError(
            f"{call}: unexpected keyword argument(s) {sorted(left)}: keywords beyond the options "
            "give the values of cl.Given constraints, and none is named so. Check the spelling "
            f"(the constraints' cl.Given names: {names or 'none'})."
        )
    if variance is not None and isinstance(variance, Tensor) and variance.shape != u.shape:
        try:
            variance = torch.broadcast_to(variance, u.shape)
        except RuntimeError:
            raise ValueError(
                f"{call}: variance of shape {tuple(variance.shape)} does not broadcast to the "
                f"shape of u {tuple(u.shape)}; give one variance per value of u."
            ) from None
    spec = SimpleNamespace(
        layout=layout, grid_shape=check_flat_grid(grid_shape, call), spacing=spacing,
        extent=extent, endpoint=bool(endpoint), grid=GridSpec(spacing, extent, bool(endpoint)),
    )  # fmt: skip
    k = max(u.ndim - 1, 1) if event_ndim is None else int(event_ndim)
    pred = Gaussian(u, variance, covariance, low_rank, None, k)
    post = project_prediction(
        pred, items, layout=layout, grid=spec.grid, lift=check_lift(lift, call),
        noise=check_noise(noise, items, call), metric=check_metric(metric, call),
        grid_shape=spec.grid_shape, inputs=inputs, call=call,
    )  # fmt: skip
    if debug:
        check_rows(spec, post, inputs, items)
    if variance is None and covariance is None and low_rank is None:
        return post.mean
    return post


def check_posterior(constraints: Sequence[Any], layout: str, call: str) -> None:
    """The structured posterior serves conservation rows on grid outputs only."""
    if layout == "points":
        raise NotImplementedError(
            f"{call}: the structured posterior serves grid outputs; on a point cloud call the "
            "wrapper (its output carries the conditioned Gaussian)."
        )
    bnd, _ = split_families(constraints)
    if bnd or any(c.family == "bounds" for c in constraints):
        raise NotImplementedError(
            f"{call}: the structured posterior serves conservation constraints; with boundary "
            "conditions or bounds call the wrapper (its output carries the conditioned Gaussian)."
        )


def structured_posterior(
    g: Gaussian,
    constraints: Sequence[Any],
    *,
    grid_shape: Sequence[int] | None,
    noise: Any,
    metric: str,
    inputs: Any,
    call: str,
) -> Any:
    """The :class:`~constraint_layers.functional.ConstrainedGaussian` of a Gaussian record (in
    physical units) conditioned on the conservation rows of ``constraints``."""
    from ._engine.streaming import stacked_posterior

    _, con = split_families(constraints)
    k = g.event_ndim
    shape = grid_view(g.mean, k, grid_shape, call)
    lead = g.mean.shape[: g.mean.ndim - k]
    with under_call(call):
        return stacked_posterior(
            g.mean, g.variance, g.covariance, g.low_rank, con, shape, lead, k, noise, metric,
            inputs,
        )  # fmt: skip
