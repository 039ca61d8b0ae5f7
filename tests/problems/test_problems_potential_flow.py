"""The potential flow past a cylinder: divergence-free, irrotational, no penetration, far field."""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl

F64 = torch.float64


def test_divergence_and_curl_vanish_by_autograd():
    flow = cl.problems.PotentialFlow(radius=0.5)
    p = flow.interior(200, torch.Generator().manual_seed(0)).requires_grad_()
    s, a = torch.tensor([1.3], dtype=F64), torch.tensor([0.4], dtype=F64)
    u = flow.velocity(p, s, a)[0]
    (du,) = torch.autograd.grad(u[:, 0].sum(), p, create_graph=True)
    (dv,) = torch.autograd.grad(u[:, 1].sum(), p, create_graph=True)
    div = du[:, 0] + dv[:, 1]
    curl = dv[:, 0] - du[:, 1]
    assert float(div.abs().max()) < 1e-12
    assert float(curl.abs().max()) < 1e-12


def test_no_penetration_and_far_field():
    flow = cl.problems.PotentialFlow(radius=0.5)
    pts, n = flow.surface(64)
    s, a = torch.tensor([0.7, 1.2], dtype=F64), torch.tensor([0.0, -0.5], dtype=F64)
    u = flow.velocity(pts, s, a)
    assert float((u * n).sum(-1).abs().max()) < 1e-14
    # tangential speed on the surface: 2 U sin(theta - alpha)
    theta = torch.atan2(pts[:, 1], pts[:, 0])
    speed = u.norm(dim=-1)
    ref = (2 * s[:, None] * torch.sin(theta[None] - a[:, None])).abs()
    torch.testing.assert_close(speed, ref, rtol=0, atol=1e-13)
    far = torch.tensor([[1e4, 3e3]], dtype=F64)
    inflow = torch.stack([s * a.cos(), s * a.sin()], -1)
    torch.testing.assert_close(flow.velocity(far, s, a)[:, 0], inflow, rtol=0, atol=1e-8)


def test_generate_layout():
    data = cl.problems.PotentialFlow().generate(3, n_surface=16, n_interior=40, per_side=4)
    P = 16 + 16 + 40
    assert data.points.shape == (P, 2) and data.velocity.shape == (3, P, 2)
    assert int(data.surface.sum()) == 16 and int(data.outer.sum()) == 16
    assert (
        float((data.velocity[:, data.surface] * data.normals[data.surface]).sum(-1).abs().max())
        < 1e-14
    )
    assert bool((data.points[~data.surface].norm(dim=-1) > 0.5).all())
    torch.testing.assert_close(data.inflow.norm(dim=-1) >= 0.5, torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="inside the cylinder"):
        cl.problems.PotentialFlow().velocity(torch.zeros(1, 2), torch.ones(1), torch.zeros(1))
    assert math.isclose(cl.problems.PotentialFlow(0.3, 1.0).box, 1.0)
