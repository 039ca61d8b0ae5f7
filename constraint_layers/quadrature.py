"""Quadrature weights on sorted, possibly non-uniform grids.

A conservation constraint "the total mass at time t equals b(t)" becomes LINEAR in the predicted
values once the integral is replaced by a quadrature rule: ``sum_i w_i u_i = b``. The functions here
return the weights ``w`` of three rules on a 1-D grid, and their tensor products for domains of
several dimensions.

Grids hold their boundary nodes (the convention of the whole library): ``N`` nodes on ``[0, L]``
have spacing ``L / (N - 1)``, and the rules integrate over ``[x_0, x_{N-1}]``. A periodic grid that
leaves out the end node (``endpoint=False``, ``linspace(0, L, N + 1)[:-1]``) integrates over one
period with the periodic trapezoid rule (every weight ``L / N``).

Rules
-----
``"trapezoid"``
    Composite trapezoid: ``w_0 = (x_1 - x_0) / 2``, ``w_i = (x_{i+1} - x_{i-1}) / 2``,
    ``w_{N-1} = (x_{N-1} - x_{N-2}) / 2``. Second order; exact for linear functions.
``"simpson"``
    Composite Simpson on pairs of (possibly unequal) intervals; with an odd number of intervals the
    last one is integrated with the quadratic through the last three nodes. Exact for quadratics
    (cubics on uniform grids with an even number of intervals). Needs at least 3 nodes.
``"right"``
    Right Riemann sum: ``w_0 = 0``, ``w_i = x_i - x_{i-1}``. First order; the rule of explicit
    time-stepping bookkeeping.

Examples
--------
>>> import torch
>>> from constraint_layers import quadrature
>>> quadrature.trapezoid(5).tolist()
[0.125, 0.25, 0.25, 0.25, 0.125]
>>> x = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
>>> w = quadrature.simpson(x)
>>> round(float(w @ x**2), 12)  # exact for quadratics: 1/3
0.333333333333
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import GridError

__all__ = [
    "RULES",
    "cumulative_trapezoid",
    "right_riemann",
    "simpson",
    "tensor_product",
    "trapezoid",
    "weights",
]

#: The rule names :func:`weights` accepts, with the fewest nodes each needs.
RULES: dict[str, int] = {"trapezoid": 2, "simpson": 3, "right": 2}

Points = int | Tensor | Sequence[float]


def _nodes(
    points: Points,
    *,
    spacing: float | None,
    extent: float | None,
    endpoint: bool,
    need: int,
    rule: str,
    call: str,
) -> tuple[Tensor | None, int, float | None]:
    """Validate the grid: ``(coordinates or None, number of nodes, uniform spacing or None)``."""
    if isinstance(points, bool):
        raise TypeError(f"{call}: points must be an int or a 1-D tensor of coordinates, got bool.")
    if isinstance(points, int):
        n = points
        coords = None
    else:
        coords = torch.as_tensor(points)
        if coords.ndim != 1:
            raise GridError(
                f"{call}: grid coordinates must be a 1-D tensor, got shape {tuple(coords.shape)}."
            )
        if not coords.is_floating_point():
            coords = coords.to(torch.float64)
        n = coords.shape[0]
        if spacing is not None or extent is not None:
            raise ValueError(
                f"{call}: give either grid coordinates or spacing=/extent=, not both (the "
                "coordinates fix the spacing)."
            )
    if n < need:
        raise GridError(
            f"{call}: the {rule!r} rule needs at least {need} grid nodes, got {n}. Use a finer "
            "grid or another rule."
        )
    if coords is not None:
        c = coords.detach().to(torch.float64)
        if not bool(torch.isfinite(c).all()):
            raise GridError(f"{call}: grid coordinates hold NaN or inf.")
        steps = c[1:] - c[:-1]
        bad = (steps <= 0).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise GridError(
                f"{call}: grid coordinates must be strictly increasing, but x[{i}] = "
                f"{float(c[i]):.6g} >= x[{i + 1}] = {float(c[i + 1]):.6g}. Sort the grid (and "
                "the values with it) first."
            )
        if not endpoint:
            raise ValueError(
                f"{call}: endpoint=False describes a uniform periodic grid; with explicit "
                "coordinates the rule integrates over [x_0, x_{N-1}] (append the period's end "
                "node to integrate over a full period)."
            )
        return coords, n, None
    if spacing is not None and extent is not None:
        raise ValueError(
            f"{call}: give either spacing= (fixed) or extent= (domain length), not both."
        )
    if spacing is not None:
        h = float(spacing)
        name, val = "spacing", h
    else:
        length = 1.0 if extent is None else float(extent)
        name, val = "extent", length
        h = length / ((n - 1) if endpoint else n)
    if not (math.isfinite(val) and val > 0):
        raise GridError(f"{call}: {name} must be finite and positive, got {val}.")
    return None, n, h


def _steps(coords: Tensor | None, n: int, h: float | None, dtype, device) -> Tensor:
    if coords is None:
        return torch.full((n - 1,), h, dtype=dtype, device=device)
    c = coords.to(dtype=dtype, device=device if device is not None else coords.device)
    return c[1:] - c[:-1]


def _out(coords: Tensor | None, dtype, device) -> tuple[torch.dtype, torch.device | None]:
    if dtype is None:
        dtype = coords.dtype if coords is not None else torch.float64
    if device is None and coords is not None:
        device = coords.device
    return dtype, device


def trapezoid(
    points: Points,
    *,
    spacing: float | None = None,
    extent: float | None = None,
    endpoint: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Composite trapezoid weights on a sorted grid.

    Parameters
    ----------
    points : int or Tensor
        The number of nodes of a uniform grid, or the node coordinates (1-D, strictly increasing;
        shape: (N,)).
    spacing : float, optional
        Uniform spacing (exclusive with ``extent`` and with coordinates).
    extent : float, optional
        Domain length of a uniform grid (default 1): spacing ``extent / (N - 1)``, or
        ``extent / N`` with ``endpoint=False``.
    endpoint : bool, default True
        Whether the uniform grid holds the node at the high end. ``False``: a periodic grid, and
        the periodic trapezoid rule (every weight equals the spacing).
    dtype, device
        Of the result (default: the coordinates' dtype, else float64).

    Returns
    -------
    Tensor
        shape: (N,)

    Raises
    ------
    GridError
        Fewer than 2 nodes; coordinates not strictly increasing, or holding NaN.

    Examples
    --------
    >>> from constraint_layers import quadrature
    >>> quadrature.trapezoid(3, extent=2.0).tolist()
    [0.5, 1.0, 0.5]
    >>> quadrature.trapezoid(4, extent=2.0, endpoint=False).tolist()
    [0.5, 0.5, 0.5, 0.5]
    """
    call = "quadrature.trapezoid"
    coords, n, h = _nodes(
        points, spacing=spacing, extent=extent, endpoint=endpoint, need=2, rule="trapezoid",
        call=call,
    )  # fmt: skip
    dtype, device = _out(coords, dtype, device)
    if coords is None and not endpoint:
        return torch.full((n,), h, dtype=dtype, device=device)
    d = _steps(coords, n, h, dtype, device)
    w = torch.zeros(n, dtype=dtype, device=d.device)
    w[:-1] += d / 2
    w[1:] += d / 2
    return w


def right_riemann(
    points: Points,
    *,
    spacing: float | None = None,
    extent: float | None = None,
    endpoint: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Right Riemann-sum weights: ``w_0 = 0``, ``w_i = x_i - x_{i-1}``.

    Parameters and errors as for :func:`trapezoid`; a periodic grid (``endpoint=False``) gives
    every node the spacing.

    Returns
    -------
    Tensor
        shape: (N,)

    Examples
    --------
    >>> from constraint_layers import quadrature
    >>> quadrature.right_riemann(5).tolist()
    [0.0, 0.25, 0.25, 0.25, 0.25]
    """
    call = "quadrature.right_riemann"
    coords, n, h = _nodes(
        points, spacing=spacing, extent=extent, endpoint=endpoint, need=2, rule="right", call=call
    )
    dtype, device = _out(coords, dtype, device)
    if coords is None and not endpoint:
        return torch.full((n,), h, dtype=dtype, device=device)
    d = _steps(coords, n, h, dtype, device)
    return torch.cat([torch.zeros(1, dtype=dtype, device=d.device), d])


def simpson(
    points: Points,
    *,
    spacing: float | None = None,
    extent: float | None = None,
    endpoint: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Composite Simpson weights on a sorted, possibly non-uniform grid.

    Pairs of intervals ``[x_{2k}, x_{2k+2}]`` are integrated with the quadratic through their three
    nodes; with an odd number of intervals the last interval is integrated with the quadratic
    through the last three nodes. Parameters and errors as for :func:`trapezoid` (at least 3 nodes;
    no periodic form).

    Returns
    -------
    Tensor
        shape: (N,)

    Examples
    --------
    >>> from constraint_layers import quadrature
    >>> [round(v * 12, 12) for v in quadrature.simpson(5).tolist()]  # h = 1/4: (1 4 2 4 1) h / 3
    [1.0, 4.0, 2.0, 4.0, 1.0]
    """
    call = "quadrature.simpson"
    if not endpoint:
        raise ValueError(
            f"{call}: no periodic Simpson rule; on a periodic grid (endpoint=False) use "
            "rule='trapezoid', which is spectrally accurate there."
        )
    coords, n, h = _nodes(
        points, spacing=spacing, extent=extent, endpoint=True, need=3, rule="simpson", call=call
    )
    dtype, device = _out(coords, dtype, device)
    d = _steps(coords, n, h, dtype, device)
    w = torch.zeros(n, dtype=dtype, device=d.device)
    pairs = (n - 1) // 2
    if pairs:
        h0, h1 = d[0 : 2 * pairs : 2], d[1 : 2 * pairs : 2]
        s = h0 + h1
        w[0 : 2 * pairs : 2] += s / 6 * (2 - h1 / h0)
        w[1 : 2 * pairs : 2] += s**3 / (6 * h0 * h1)
        w[2 : 2 * pairs + 1 : 2] += s / 6 * (2 - h0 / h1)
    if (n - 1) % 2:  # one interval left over: the quadratic through the last three nodes
        h0, h1 = d[-2], d[-1]
        w[-1] += (2 * h1**2 + 3 * h0 * h1) / (6 * (h0 + h1))
        w[-2] += (h1**2 + 3 * h0 * h1) / (6 * h0)
        w[-3] -= h1**3 / (6 * h0 * (h0 + h1))
    return w


_RULE_FUNCS = {"trapezoid": trapezoid, "simpson": simpson, "right": right_riemann}


def weights(
    points: Points,
    rule: str = "trapezoid",
    *,
    spacing: float | None = None,
    extent: float | None = None,
    endpoint: bool = True,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The weights of ``rule`` (``"trapezoid"``, ``"simpson"`` or ``"right"``) on a grid.

    Returns
    -------
    Tensor
        shape: (N,)

    Examples
    --------
    >>> from constraint_layers import quadrature
    >>> quadrature.weights(3, "right", spacing=0.5).tolist()
    [0.0, 0.5, 0.5]
    """
    if rule not in _RULE_FUNCS:
        raise ValueError(f"quadrature.weights: rule must be one of {list(RULES)}, got {rule!r}.")
    return _RULE_FUNCS[rule](
        points, spacing=spacing, extent=extent, endpoint=endpoint, dtype=dtype, device=device
    )


def tensor_product(*ws: Tensor) -> Tensor:
    """Weights of a tensor-product rule from 1-D weights ``w_1, ..., w_k``.

    Parameters
    ----------
    *ws : Tensor
        shape: (n_j,) each.

    Returns
    -------
    Tensor
        shape: (n_1, ..., n_k); entry ``(i_1, ..., i_k)`` is ``w_1[i_1] * ... * w_k[i_k]``.

    Examples
    --------
    >>> from constraint_layers import quadrature
    >>> w = quadrature.tensor_product(quadrature.trapezoid(3), quadrature.trapezoid(2))
    >>> w.shape, float(w.sum())
    (torch.Size([3, 2]), 1.0)
    """
    if not ws:
        raise ValueError("quadrature.tensor_product: expected at least one weight vector.")
    out = None
    for w in ws:
        if not isinstance(w, Tensor) or w.ndim != 1:
            raise ValueError(
                "quadrature.tensor_product: expected 1-D weight tensors, got "
                f"{getattr(w, 'shape', type(w).__name__)}."
            )
        out = w if out is None else out.unsqueeze(-1) * w
    return out


def cumulative_trapezoid(
    y: Tensor,
    x: Tensor | None = None,
    *,
    spacing: float | None = None,
    dim: int = -1,
    initial: float | Tensor = 0.0,
) -> Tensor:
    """Running trapezoid integral of ``y`` along ``dim``, starting from ``initial``.

    ``out[..., 0] = initial`` and ``out[..., k] = initial + integral from x_0 to x_k``.

    Parameters
    ----------
    y : Tensor
        shape: (..., T, ...); the integrand, ``T >= 1`` samples along ``dim``.
    x : Tensor, optional
        shape: (T,); sorted sample positions. Exclusive with ``spacing``; default spacing 1.
    spacing : float, optional
        Uniform spacing.
    dim : int, default -1
    initial : float or Tensor
        The value at ``x_0``; a tensor broadcasts against ``y`` with ``dim`` removed.

    Returns
    -------
    Tensor
        shape: same as ``y``.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers import quadrature
    >>> quadrature.cumulative_trapezoid(torch.tensor([1.0, 1.0, 3.0]), initial=2.0).tolist()
    [2.0, 3.0, 5.0]
    """
    call = "quadrature.cumulative_trapezoid"
    if not isinstance(y, Tensor):
        raise TypeError(f"{call}: y must be a tensor, got {type(y).__name__}.")
    if not y.is_floating_point():
        y = y.to(torch.get_default_dtype())
    n = y.shape[dim] if y.ndim else 0
    if n < 1:
        raise GridError(f"{call}: y needs at least one sample along dim={dim}, got shape "
                        f"{tuple(y.shape)}.")  # fmt: skip
    yt = y.movedim(dim, -1)
    if n == 1:
        d = torch.zeros(0, dtype=y.dtype, device=y.device)
    elif x is not None:
        if spacing is not None:
            raise ValueError(f"{call}: give either x= or spacing=, not both.")
        coords, m, _ = _nodes(
            x, spacing=None, extent=None, endpoint=True, need=1, rule="trapezoid", call=call
        )
        if m != n:
            raise GridError(f"{call}: x has {m} positions but y has {n} samples along dim={dim}.")
        d = _steps(coords, n, None, y.dtype, y.device)
    else:
        h = 1.0 if spacing is None else float(spacing)
        if not (math.isfinite(h) and h > 0):
            raise GridError(f"{call}: spacing must be finite and positive, got {h}.")
        d = torch.full((n - 1,), h, dtype=y.dtype, device=y.device)
    steps = (yt[..., 1:] + yt[..., :-1]) * (d / 2)
    init = torch.as_tensor(initial, dtype=y.dtype, device=y.device)
    base = torch.broadcast_to(init, torch.broadcast_shapes(init.shape, yt.shape[:-1]))
    out = torch.cat([base.unsqueeze(-1), base.unsqueeze(-1) + torch.cumsum(steps, -1)], -1)
    return out.movedim(-1, dim)
