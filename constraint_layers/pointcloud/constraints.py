"""Constraints stated on point clouds (channel-last outputs ``(batch, n_points, channels)``).

Three kinds, each linear in the output ``u`` (one sample is ``(P, C)``: ``P`` points, ``C``
channels, flattened point-major, ``p * C + c``, when rows are written densely):

- :class:`PointValue`, made by ``cl.Dirichlet(value, points=...)``: ``u[p, c] = g[p, c]`` at the
  selected points and channels (one coordinate row each; held to the bit).
- :class:`NormalComponent`: ``sum_c n[p, c] u[p, c] = g[p]`` at each selected point (one row per
  point over the vector channels: no penetration through a surface is ``g = 0``).
- :class:`PointIntegral`, made by ``cl.Conservation.integral(total, weights=...)``:
  ``sum_p w[r, p] u[p, c] = total[r, c]`` per channel ``c`` and weight row ``r`` (quadrature
  weights per point: cell volumes; see :func:`constraint_layers.pointcloud.voronoi_weights`).

Every value (and the normals, the weights) may be a number or a tensor, a callable of the model
input, or ``cl.Given("name")`` (per-sample geometry that travels with the batch). The point
selection is fixed: a boolean mask over the points ``(P,)`` or per sample ``(batch, P)``, or an
index tensor ``(K,)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._values import Given, check_value, evaluate_value
from ..boundary.conditions import BoundaryCondition

__all__ = ["NormalComponent", "PointConstraint", "PointIntegral", "PointValue"]

F64 = torch.float64


class PointConstraint:
    """Base class of the constraints on point clouds (``family = "points"``)."""

    family: ClassVar[str] = "points"
    value_attr: ClassVar[Any] = "value"


def _check_points(points: object, call: str) -> Tensor:
    """A fixed point selection: a bool mask (P,) or (batch, P), or long indices (K,)."""
    if isinstance(points, Given):
        raise TypeError(
            f"{call}: points must be fixed (a bool mask over the points or an index tensor); "
            "per-sample geometry travels through the values and normals (cl.Given), with a mask "
            "that selects every point they may concern."
        )
    if isinstance(points, Sequence) and not isinstance(points, str):
        points = torch.as_tensor(list(points))
    if not isinstance(points, Tensor):
        raise TypeError(
            f"{call}: points must be a bool mask (n_points,) or (batch, n_points), or an index "
            f"tensor (K,), got {type(points).__name__}."
        )
    if points.dtype == torch.bool:
        if points.ndim not in (1, 2):
            raise ValueError(
                f"{call}: a points mask must have shape (n_points,) or (batch, n_points), got "
                f"{tuple(points.shape)}."
            )
        return points
    if points.is_floating_point() or points.is_complex() or points.ndim != 1:
        raise TypeError(
            f"{call}: points given as indices must be a 1D integer tensor (K,), got dtype "
            f"{points.dtype} and shape {tuple(points.shape)}."
        )
    if points.numel() and int(points.min()) < 0:
        raise ValueError(f"{call}: point indices must be >= 0, got {int(points.min())}.")
    if points.unique().numel() != points.numel():
        raise ValueError(f"{call}: point indices hold duplicates.")
    return points.long()


def _check_channels(channels: object, call: str) -> tuple[int, ...] | None:
    return BoundaryCondition._check_channels(channels, call)


def _channels(channels: tuple[int, ...] | None, n: int, call: str) -> list[int]:
    if channels is None:
        return list(range(n))
    bad = [c for c in channels if not -n <= c < n]
    if bad:
        raise ValueError(
            f"{call}: channel {bad[0]} is out of range for an output with {n} channel(s) "
            "(the last axis of a point cloud)."
        )
    out = [c % n for c in channels]
    if len(set(out)) != len(out):
        raise ValueError(f"{call}: channels {channels} name the same channel twice.")
    return out


def _mask(points: Tensor, batch: int, n_points: int, call: str) -> Tensor:
    """The selection as a bool mask (1 or batch, P)."""
    if points.dtype == torch.bool:
        if points.shape[-1] != n_points:
            raise ValueError(
                f"{call}: the points mask has {points.shape[-1]} entries, but the output has "
                f"{n_points} points."
            )
        if points.ndim == 2 and points.shape[0] not in (1, batch):
            raise ValueError(
                f"{call}: the points mask has shape {tuple(points.shape)}; expected (n_points,) "
                f"or (batch, n_points) with batch {batch}."
            )
        return points.reshape(-1, n_points)
    if points.numel() and int(points.max()) >= n_points:
        raise ValueError(
            f"{call}: point index {int(points.max())} is out of range for an output with "
            f"{n_points} points."
        )
    m = torch.zeros(1, n_points, dtype=torch.bool, device=points.device)
    m[0, points] = True
    return m


def _spread(
    value: Tensor | float, points: Tensor, shape: tuple[int, ...], call: str, what: str, form: str
) -> Tensor:
    """A value over the selected points as a tensor over the whole cloud.

    ``shape`` is ``(batch, P, k)``: a value given per selected point (index selection) is
    ``(..., K, k)`` and is scattered to its points; a mask selection takes values over all the
    points. Broadcast to ``shape``, float64.
    """
    n_points = shape[1]
    v = torch.as_tensor(value, dtype=F64) if not isinstance(value, Tensor) else value.to(F64)
    if points.dtype == torch.bool and points.ndim == 1:
        where = points.nonzero().flatten()  # a shared mask: values may come per selected point
    else:
        where = points if points.dtype != torch.bool else None
    per_selected = where is not None and v.ndim >= 2 and v.shape[-2] == where.numel() > 1
    if per_selected and (points.dtype != torch.bool or where.numel() != n_points):
        full = v.new_zeros((*v.shape[:-2], n_points, v.shape[-1]))
        full[..., where.to(v.device), :] = v
        v = full
    try:
        return torch.broadcast_to(v, shape)
    except RuntimeError:
        raise ValueError(
            f"{call}: got {what} of shape {tuple(v.shape)}; expected {form} broadcastable to "
            f"{shape}, or one entry per selected point (..., K, k)."
        ) from None


class PointValue(PointConstraint):
    """Prescribed values at points of a point cloud: ``u[p, c] = value``.

    Made by ``cl.Dirichlet(value, points=...)``. The constrained output holds the value to the
    bit at the selected points and channels; no other value moves.

    Parameters
    ----------
    value : float, Tensor, callable or Given, default 0.0
        A number; a tensor broadcastable to ``(batch, n_points, n_channels)`` (or
        ``(batch, K, n_channels)`` per selected point when ``points`` holds indices); a callable of
        the model input returning one; or ``cl.Given("name")``.
    points : Tensor or sequence
        Which points: a bool mask ``(n_points,)`` or ``(batch, n_points)``, or indices ``(K,)``.
    channels : int or sequence of int, optional
        The channels held (default: all); ``n_channels`` above counts these.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> wall = cl.Dirichlet(0.0, points=torch.tensor([0, 3]))
    >>> model = cl.wrap(torch.nn.Linear(2, 2), wall, layout="points")
    >>> y = model(torch.randn(1, 5, 2))  # (batch, n_points, channels)
    >>> y[0, [0, 3]].abs().max().item()
    0.0
    """

    def __init__(
        self,
        value: Any = 0.0,
        *,
        points: Any,
        channels: int | Sequence[int] | None = None,
    ) -> None:
        call = "Dirichlet(points=...)"
        self.points = _check_points(points, call)
        self.channels = _check_channels(channels, call)
        self.value = check_value(
            value, call, "value", " broadcastable to (batch, n_points, n_channels)"
        )

    def resolve(self, shape, inputs, call) -> tuple[Tensor, Tensor]:
        """``(fixed, values)``: bool (1 or batch, P, C) and float64 (batch, P, C)."""
        batch, n_points, n_ch = shape
        where = f"{call}: {self!r}"
        ch = _channels(self.channels, n_ch, where)
        mask = _mask(self.points, batch, n_points, where)
        value = evaluate_value(self.value, inputs, where, "value")
        v = _spread(value, self.points, (batch, n_points, len(ch)), where, "value",
                    "(batch, n_points, n_channels)")  # fmt: skip
        fixed = torch.zeros((mask.shape[0], n_points, n_ch), dtype=torch.bool, device=mask.device)
        fixed[..., ch] = mask.unsqueeze(-1)
        full = torch.zeros((batch, n_points, n_ch), dtype=F64, device=v.device)
        full[..., ch] = v
        return fixed, full

    def __repr__(self) -> str:
        return f"Dirichlet({_show(self.value)}, points={_show_points(self.points)})"


class NormalComponent(PointConstraint):
    """The component of a vector field along given normals at points: ``u·n = value``.

    One row per selected point over the vector channels, e.g. no penetration through a surface
    (``value=0``) with the surface normals. Deterministic outputs move by the Euclidean projection
    ``u - n (u . n - value) / |n|^2`` at each point (nothing else moves); Gaussian outputs with a
    diagonal variance are conditioned per point.

    Parameters
    ----------
    value : float, Tensor, callable or Given, default 0.0
        A number, or a tensor broadcastable to ``(batch, n_points)`` (``(batch, K)`` per selected
        point with index selection); a callable of the model input; or ``cl.Given("name")``.
    normals : Tensor, callable or Given
        The normals ``(n_points, d)`` or ``(batch, n_points, d)`` (``K`` in place of
        ``n_points`` with index selection), ``d = len(channels)``; need not be unit vectors.
    points : Tensor or sequence
        Which points (a bool mask, or indices).
    channels : sequence of int
        The vector channels, one per component of the normals, in order.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> n = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    >>> c = cl.NormalComponent(0.0, normals=n, points=[1, 2], channels=(0, 1))
    >>> model = cl.wrap(torch.nn.Linear(2, 2), c, layout="points")
    >>> y = model(torch.randn(3, 4, 2))
    >>> bool(((y[:, [1, 2]] * n).sum(-1).abs() < 1e-6).all())
    True
    """

    value_attr: ClassVar[Any] = ("value", "normals")

    def __init__(
        self,
        value: Any = 0.0,
        *,
        normals: Any,
        points: Any,
        channels: Sequence[int],
    ) -> None:
        call = "NormalComponent"
        self.points = _check_points(points, call)
        self.channels = _check_channels(channels, call)
        if self.channels is None:
            raise ValueError(f"{call}: channels must name the vector channels, e.g. (0, 1).")
        self.value = check_value(value, call, "value", " broadcastable to (batch, n_points)")
        self.normals = check_value(
            normals, call, "normals", " (n_points, d) or (batch, n_points, d)"
        )

    def resolve(self, shape, inputs, call) -> tuple[Tensor, Tensor, Tensor]:
        """``(normal, active, value)``: float64 (batch|1, P, C) with zeros off the vector channels
        and inactive points, bool (batch|1, P), float64 (batch, P)."""
        batch, n_points, n_ch = shape
        where = f"{call}: {self!r}"
        ch = _channels(self.channels, n_ch, where)
        mask = _mask(self.points, batch, n_points, where)
        nv = evaluate_value(self.normals, inputs, where, "normals")
        if not isinstance(nv, Tensor) or nv.ndim < 2 or nv.shape[-1] != len(ch):
            got = tuple(nv.shape) if isinstance(nv, Tensor) else type(nv).__name__
            raise ValueError(
                f"{where}: the normals must be a tensor (n_points, {len(ch)}) or "
                f"(batch, n_points, {len(ch)}) (K in place of n_points with index selection), "
                f"one component per channel {tuple(ch)}; got {got}."
            )
        lead = batch if nv.ndim == 3 else 1
        n = _spread(nv, self.points, (lead, n_points, len(ch)), where, "normals",
                    f"(batch, n_points, {len(ch)})")  # fmt: skip
        n = n * mask.unsqueeze(-1).to(n.device)
        normal = torch.zeros((lead, n_points, n_ch), dtype=F64, device=n.device)
        normal[..., ch] = n
        value = evaluate_value(self.value, inputs, where, "value")
        v = _spread(_as_column(value), self.points, (batch, n_points, 1), where, "value",
                    "(batch, n_points)")[..., 0]  # fmt: skip
        return normal, mask, v * mask.to(v.device)

    def __repr__(self) -> str:
        return (
            f"NormalComponent({_show(self.value)}, points={_show_points(self.points)}, "
            f"channels={self.channels})"
        )


def _as_column(value: Any) -> Any:
    """A per-point value ``(..., P)`` as ``(..., P, 1)``; numbers unchanged."""
    if isinstance(value, Tensor) and value.ndim >= 1:
        return value.unsqueeze(-1)
    return value


class PointIntegral(PointConstraint):
    """A weighted sum over the points equals a total, per channel: ``sum_p w_p u[p, c] = total``.

    Made by ``cl.Conservation.integral(total, weights=...)``. With quadrature weights (cell
    volumes) the sum is the integral of the field over the domain.

    Parameters
    ----------
    total : float, Tensor, callable or Given, default 0.0
        A number, or a tensor broadcastable to ``(batch, R, n_channels)`` (``R`` weight rows).
    weights : Tensor, callable or Given
        ``(n_points,)`` (one row), ``(R, n_points)`` (e.g. one row per time frame of scattered
        ``(t, x)`` points), or per sample ``(batch, R, n_points)``.
    channels : int or sequence of int, optional
        The channels integrated, each on its own (default: all).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> w = torch.full((10,), 0.1)
    >>> mass = cl.Conservation.integral(1.0, weights=w)
    >>> model = cl.wrap(torch.nn.Linear(1, 1), mass, layout="points")
    >>> y = model(torch.randn(2, 10, 1))
    >>> bool(((y[..., 0] * w).sum(-1) - 1.0).abs().max() < 1e-6)
    True
    """

    value_attr: ClassVar[Any] = ("total", "weights")

    def __init__(
        self,
        total: Any = 0.0,
        *,
        weights: Any,
        channels: int | Sequence[int] | None = None,
    ) -> None:
        call = "Conservation.integral(weights=...)"
        self.channels = _check_channels(channels, call)
        self.total = check_value(total, call, "total", " broadcastable to (batch, R, n_channels)")
        self.weights = check_value(weights, call, "weights", " (n_points,) or (R, n_points)")

    def resolve(self, shape, inputs, call) -> tuple[Tensor, Tensor]:
        """Dense rows ``(D, d)``: float64 (batch|1, M, P, C) and (batch, M), ``M = R * n_ch``."""
        batch, n_points, n_ch = shape
        where = f"{call}: {self!r}"
        ch = _channels(self.channels, n_ch, where)
        w = evaluate_value(self.weights, inputs, where, "weights")
        if not isinstance(w, Tensor) or w.ndim not in (1, 2, 3):
            got = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
            raise ValueError(
                f"{where}: the weights must be a tensor (n_points,), (R, n_points) or "
                f"(batch, R, n_points) with n_points = {n_points}; got {got}."
            )
        if w.shape[-1] != n_points:
            raise ValueError(
                f"{where}: the weights cover {w.shape[-1]} points, but the output has {n_points}. "
                "A weighted integral holds over the whole cloud in one call: predicting in "
                "minibatches (an SVGP over a DataLoader) cannot hold a total over all points. "
                "Predict every point at once, or give each minibatch its own weights and total "
                "(cl.Given), which then hold per minibatch."
            )
        w = w.to(F64)
        w = w.reshape(1, 1, n_points) if w.ndim == 1 else w.reshape(-1, *w.shape[-2:])
        if w.shape[0] not in (1, batch):
            raise ValueError(
                f"{where}: the weights have batch {w.shape[0]}, the output has batch {batch}."
            )
        r = w.shape[1]
        eye = torch.eye(n_ch, dtype=F64, device=w.device)[ch]  # (n_sel, C)
        D = w[:, :, None, :, None] * eye[None, None, :, None, :]  # (lead, R, n_sel, P, C)
        D = D.reshape(w.shape[0], r * len(ch), n_points, n_ch)
        total = evaluate_value(self.total, inputs, where, "total")
        t = torch.as_tensor(total, dtype=F64) if not isinstance(total, Tensor) else total.to(F64)
        try:
            d = torch.broadcast_to(t, (batch, r, len(ch))).reshape(batch, r * len(ch))
        except RuntimeError:
            raise ValueError(
                f"{where}: the total has shape {tuple(t.shape)}; expected a tensor broadcastable "
                f"to (batch, R, n_channels) = ({batch}, {r}, {len(ch)})."
            ) from None
        return D, d

    def __repr__(self) -> str:
        return f"Conservation.integral({_show(self.total)}, weights={_show(self.weights)})"


def _show(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"tensor{tuple(value.shape)}"
    if isinstance(value, Given):
        return repr(value)
    if callable(value):
        return getattr(value, "__name__", "callable")
    return repr(value)


def _show_points(points: Tensor) -> str:
    if points.dtype == torch.bool:
        return f"mask{tuple(points.shape)}"
    if points.numel() <= 4:
        return str(points.tolist())
    return f"{points.numel()} indices"
