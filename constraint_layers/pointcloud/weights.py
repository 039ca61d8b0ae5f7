"""Quadrature weights for scattered points: ``sum_p w_p f(x_p)`` approximates an integral.

- :func:`voronoi_weights`: the volume of each point's Voronoi cell clipped to the domain (a box in
  1 to 3 dimensions, or a polygon in 2D, with optional polygonal holes). The weights add up to the
  domain's volume to rounding; for a smooth ``f`` the error shrinks like the cell size (the rule is
  a piecewise-constant interpolant on the cells).
- :func:`mesh_weights`: lumped weights of a simplex mesh (segments, triangles, tetrahedra): each
  cell's volume shared equally by its vertices. Exact for functions linear on every cell.

Both return float64 tensors. :func:`voronoi_weights` needs scipy (``pip install scipy``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["mesh_weights", "voronoi_weights"]


def _array(x: Any, name: str, call: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=float)
    if not np.isfinite(a).all():
        raise ValueError(f"{call}: {name} hold NaN or inf.")
    return a


def voronoi_weights(
    points: Tensor | np.ndarray,
    domain: Any,
    *,
    holes: Sequence[Any] = (),
) -> Tensor:
    """The volume of each point's Voronoi cell inside ``domain`` (quadrature weights).

    Parameters
    ----------
    points : Tensor or array
        shape: (P, d), d in {1, 2, 3}; the points must lie in the domain and be distinct.
    domain : tuple (lo, hi) or Tensor
        A box ``(lo, hi)`` with ``lo``, ``hi`` of length ``d`` (numbers for ``d = 1``); or, in 2D,
        a simple polygon ``(V, 2)`` (vertices in order, convex or not).
    holes : sequence of polygons, optional
        2D only: polygons ``(V, 2)`` cut out of the domain (a body in a flow); their area is not
        counted.

    Returns
    -------
    Tensor
        shape: (P,), float64; they add up to the domain's volume (less the holes).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> pts = torch.rand(200, 2, generator=torch.Generator().manual_seed(0))
    >>> w = cl.pointcloud.voronoi_weights(pts, ((0.0, 0.0), (1.0, 1.0)))
    >>> round(float(w.sum()), 12)
    1.0
    """
    call = "voronoi_weights"
    p = _array(points, "points", call)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[1] not in (1, 2, 3) or p.shape[0] < 1:
        raise ValueError(f"{call}: points must have shape (P, d) with d in 1..3, got {p.shape}.")
    d = p.shape[1]
    if len(np.unique(p, axis=0)) != len(p):
        raise ValueError(f"{call}: points must be distinct (two points share a position).")
    box = _as_box(domain, d)
    if holes and d != 2:
        raise ValueError(f"{call}: holes are 2D polygons; the points are {d}D.")
    if box is not None:
        lo, hi = box
        if not (lo < hi).all():
            raise ValueError(f"{call}: the box needs lo < hi on every axis, got {lo}, {hi}.")
        if ((p < lo - 1e-12 * (hi - lo)) | (p > hi + 1e-12 * (hi - lo))).any():
            raise ValueError(
                f"{call}: some points lie outside the box {lo.tolist()}..{hi.tolist()}."
            )
        if d == 1:
            w = _interval(p[:, 0], lo[0], hi[0])
        else:
            w = _box_cells(p, lo, hi)
        if holes:
            cells = _cells_2d(p, lo, hi)
            w = w - np.array([sum(_clip_area(_poly(h, call), c) for h in holes) for c in cells])
        return torch.from_numpy(w)
    if d != 2:
        raise ValueError(f"{call}: domain must be a box (lo, hi) in {d}D; polygons are 2D only.")
    poly = _poly(domain, call)
    lo, hi = poly.min(0), poly.max(0)
    cells = _cells_2d(p, lo, hi)
    w = np.array([_clip_area(poly, c) - sum(_clip_area(_poly(h, call), c) for h in holes)
                  for c in cells])  # fmt: skip
    return torch.from_numpy(w)


def _as_box(domain: Any, d: int) -> tuple[np.ndarray, np.ndarray] | None:
    if isinstance(domain, tuple) and len(domain) == 2:
        lo = np.atleast_1d(np.asarray(domain[0], dtype=float))
        hi = np.atleast_1d(np.asarray(domain[1], dtype=float))
        if lo.shape == hi.shape == (d,):
            return lo, hi
        raise ValueError(
            f"voronoi_weights: a box domain is (lo, hi) with {d} coordinates each, got shapes "
            f"{lo.shape} and {hi.shape}."
        )
    return None


def _poly(x: Any, call: str) -> np.ndarray:
    a = _array(x, "polygon", call)
    if a.ndim != 2 or a.shape[1] != 2 or a.shape[0] < 3:
        raise ValueError(f"{call}: a polygon is (V, 2) with V >= 3 vertices, got {a.shape}.")
    return a


def _interval(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    order = np.argsort(x)
    s = x[order]
    mids = (s[1:] + s[:-1]) / 2
    edges = np.concatenate([[lo], mids, [hi]])
    w = np.empty_like(x)
    w[order] = edges[1:] - edges[:-1]
    return w


def _box_cells(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Voronoi cells clipped to a box, by mirroring the points across every face: the cells of
    the original points are then exactly the clipped cells."""
    from scipy.spatial import ConvexHull, Voronoi

    mirrors = [p]
    for axis in range(p.shape[1]):
        for bound in (lo[axis], hi[axis]):
            m = p.copy()
            m[:, axis] = 2 * bound - m[:, axis]
            mirrors.append(m)
    vor = Voronoi(np.concatenate(mirrors))
    w = np.empty(len(p))
    for i in range(len(p)):
        verts = vor.vertices[vor.regions[vor.point_region[i]]]
        w[i] = ConvexHull(verts).volume
    return w


def _cells_2d(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[np.ndarray]:
    """Each point's Voronoi cell as a convex polygon (counter-clockwise), bounded by far points."""
    from scipy.spatial import Voronoi

    span = float(np.max(hi - lo)) or 1.0
    c = (lo + hi) / 2
    far = c + 100 * span * np.array([[1, 1], [-1, 1], [-1, -1], [1, -1], [0, 1], [1, 0],
                                     [0, -1], [-1, 0]], dtype=float)  # fmt: skip
    vor = Voronoi(np.concatenate([p, far]))
    cells = []
    for i in range(len(p)):
        v = vor.vertices[vor.regions[vor.point_region[i]]]
        ang = np.arctan2(v[:, 1] - p[i, 1], v[:, 0] - p[i, 0])
        cells.append(v[np.argsort(ang)])
    return cells


def _area(poly: np.ndarray) -> float:
    if len(poly) < 3:
        return 0.0
    x, y = poly[:, 0], poly[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _clip_area(subject: np.ndarray, cell: np.ndarray) -> float:
    """Area of ``subject`` (any simple polygon) inside the convex counter-clockwise ``cell``
    (Sutherland-Hodgman with the convex polygon as the clipper)."""
    out = subject if _area(subject) >= 0 else subject[::-1]
    n = len(cell)
    for j in range(n):
        a, b = cell[j], cell[(j + 1) % n]
        e = b - a
        if len(out) == 0:
            return 0.0
        side = e[0] * (out[:, 1] - a[1]) - e[1] * (out[:, 0] - a[0])  # >= 0: inside
        res = []
        m = len(out)
        for k in range(m):
            cur, nxt = out[k], out[(k + 1) % m]
            sc, sn = side[k], side[(k + 1) % m]
            if sc >= 0:
                res.append(cur)
            if (sc >= 0) != (sn >= 0):
                t = sc / (sc - sn)
                res.append(cur + t * (nxt - cur))
        out = np.array(res)
    return abs(_area(out)) if len(out) else 0.0


def mesh_weights(vertices: Tensor | np.ndarray, cells: Tensor | np.ndarray) -> Tensor:
    """Lumped quadrature weights of a simplex mesh: each cell's volume split equally among its
    vertices.

    Parameters
    ----------
    vertices : Tensor or array
        shape: (P, d), d in {1, 2, 3}.
    cells : Tensor or array of int
        shape: (K, d + 1): segments, triangles or tetrahedra, by vertex index.

    Returns
    -------
    Tensor
        shape: (P,), float64. ``sum_p w_p f(x_p)`` is exact for ``f`` linear on every cell.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> cl.pointcloud.mesh_weights(v, torch.tensor([[0, 1, 2], [1, 3, 2]])).tolist()
    [0.16666666666666666, 0.3333333333333333, 0.3333333333333333, 0.16666666666666666]
    """
    call = "mesh_weights"
    v = _array(vertices, "vertices", call)
    if v.ndim == 1:
        v = v[:, None]
    c = cells.detach().cpu().numpy() if isinstance(cells, Tensor) else np.asarray(cells)
    d = v.shape[1]
    if c.ndim != 2 or c.shape[1] != d + 1 or not np.issubdtype(c.dtype, np.integer):
        raise ValueError(
            f"{call}: cells must be an integer array (K, {d + 1}) for {d}D vertices, got shape "
            f"{c.shape} and dtype {c.dtype}."
        )
    if c.size and (c.min() < 0 or c.max() >= len(v)):
        raise ValueError(f"{call}: cells index vertices outside 0..{len(v) - 1}.")
    edges = v[c[:, 1:]] - v[c[:, :1]]  # (K, d, d)
    vol = np.abs(np.linalg.det(edges)) / math.factorial(d)
    w = np.zeros(len(v))
    np.add.at(w, c.reshape(-1), np.repeat(vol / (d + 1), d + 1))
    return torch.from_numpy(w)
