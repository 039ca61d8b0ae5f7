"""Quadrature weights for scattered points, on integrals known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import constraint_layers as cl

pytest.importorskip("scipy")

F64 = torch.float64


def _rand(n, d, seed):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_box_2d_adds_up_and_integrates_a_smooth_function():
    pts = _rand(2000, 2, 0)
    w = cl.pointcloud.voronoi_weights(pts, ((0.0, 0.0), (1.0, 1.0)))
    assert w.shape == (2000,) and w.dtype == F64 and bool((w > 0).all())
    assert abs(float(w.sum()) - 1.0) < 1e-12
    f = torch.sin(math.pi * pts[:, 0]) * torch.sin(math.pi * pts[:, 1])
    exact = 4 / math.pi**2
    assert abs(float((w * f).sum()) - exact) / exact < 5e-3
    lin = 2 * pts[:, 0] - pts[:, 1] + 0.5  # exact integral 1.0
    assert abs(float((w * lin).sum()) - 1.0) < 2e-2


def test_error_shrinks_with_more_points():
    errs = []
    for n in (100, 400, 1600, 6400):
        pts = _rand(n, 2, n)
        w = cl.pointcloud.voronoi_weights(pts, ((0.0, 0.0), (1.0, 1.0)))
        f = torch.exp(pts[:, 0] + pts[:, 1])
        errs.append(abs(float((w * f).sum()) - (math.e - 1) ** 2))
    assert errs[-1] < errs[0] / 4


def test_box_1d_and_3d():
    x = _rand(50, 1, 1) * 2.0  # in [0, 2]
    w = cl.pointcloud.voronoi_weights(x, (0.0, 2.0))
    assert abs(float(w.sum()) - 2.0) < 1e-13
    pts = _rand(300, 3, 2)
    w3 = cl.pointcloud.voronoi_weights(pts, ((0, 0, 0), (1, 1, 1)))
    assert abs(float(w3.sum()) - 1.0) < 1e-10
    f = pts.sum(-1)  # exact 1.5
    assert abs(float((w3 * f).sum()) - 1.5) < 5e-2


def test_polygon_and_hole():
    tri = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=F64)
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(600, generator=g, dtype=F64), torch.rand(600, generator=g, dtype=F64)
    keep = a + b < 1
    pts = tri[1] * a[keep, None] + tri[2] * b[keep, None]
    w = cl.pointcloud.voronoi_weights(pts, tri)
    assert abs(float(w.sum()) - 1.0) < 1e-12  # the triangle's area
    # an L-shaped (non-convex) polygon
    ell = torch.tensor([[0, 0], [2, 0], [2, 1], [1, 1], [1, 2], [0, 2]], dtype=F64)
    q = _rand(3000, 2, 4) * 2
    q = q[~((q[:, 0] > 1) & (q[:, 1] > 1))]
    assert abs(float(cl.pointcloud.voronoi_weights(q, ell).sum()) - 3.0) < 1e-11
    # a box with a polygonal hole (a body in a flow)
    theta = torch.linspace(0, 2 * math.pi, 65, dtype=F64)[:-1]
    hole = 0.5 + 0.2 * torch.stack([theta.cos(), theta.sin()], -1)
    hole_area = 0.5 * 64 * 0.2**2 * math.sin(2 * math.pi / 64)
    p = _rand(3000, 2, 5)
    p = p[((p - 0.5).norm(dim=-1) > 0.21)]
    wh = cl.pointcloud.voronoi_weights(p, ((0.0, 0.0), (1.0, 1.0)), holes=[hole])
    assert abs(float(wh.sum()) - (1 - hole_area)) < 1e-11
    assert bool((wh > 0).all())


def test_mesh_weights_exact_for_linear_functions():
    n = 9
    xs = np.linspace(0, 1, n)
    X, Y = np.meshgrid(xs, xs, indexing="ij")
    v = torch.tensor(np.stack([X.ravel(), Y.ravel()], -1))
    v = v + 0.02 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=F64) * (
        (v > 0) & (v < 1)
    ).all(-1, keepdim=True)
    tris = []
    for i in range(n - 1):
        for j in range(n - 1):
            a, b, c, d = i * n + j, (i + 1) * n + j, i * n + j + 1, (i + 1) * n + j + 1
            tris += [[a, b, c], [b, d, c]]
    w = cl.pointcloud.mesh_weights(v, torch.tensor(tris))
    assert abs(float(w.sum()) - 1.0) < 1e-13
    f = 3 * v[:, 0] - 2 * v[:, 1] + 1  # exact integral 1.5
    assert abs(float((w * f).sum()) - 1.5) < 1e-13
    seg = cl.pointcloud.mesh_weights(torch.tensor([0.0, 0.5, 2.0]), torch.tensor([[0, 1], [1, 2]]))
    assert seg.tolist() == [0.25, 1.0, 0.75]


def test_weight_errors():
    with pytest.raises(ValueError, match="distinct"):
        cl.pointcloud.voronoi_weights(torch.zeros(3, 2), ((0, 0), (1, 1)))
    with pytest.raises(ValueError, match="outside the box"):
        cl.pointcloud.voronoi_weights(torch.tensor([[2.0, 0.5]]), ((0, 0), (1, 1)))
    with pytest.raises(ValueError, match="polygons are 2D"):
        cl.pointcloud.voronoi_weights(_rand(5, 3, 0), torch.rand(4, 2))
    with pytest.raises(ValueError, match="cells must be"):
        cl.pointcloud.mesh_weights(torch.rand(4, 2), torch.tensor([[0, 1]]))


def test_weights_feed_the_integral_constraint():
    pts = _rand(200, 2, 6)
    w = cl.pointcloud.voronoi_weights(pts, ((0.0, 0.0), (1.0, 1.0)))
    model = cl.wrap(torch.nn.Identity(), cl.Conservation.integral(2.0, weights=w), layout="points")
    y = model(torch.randn(3, 200, 1, dtype=F64))
    torch.testing.assert_close((y[..., 0] * w).sum(-1), torch.full((3,), 2.0, dtype=F64))
