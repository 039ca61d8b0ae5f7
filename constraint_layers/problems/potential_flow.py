"""Potential flow past a circular cylinder: a closed-form velocity field on scattered points.

Uniform inflow of speed ``U`` at angle ``alpha`` past a cylinder of radius ``a`` centred at the
origin has the complex potential ``w(z) = U (z e^{-i alpha} + a^2 e^{i alpha} / z)``; the velocity
is ``u - i v = w'(z) = U (e^{-i alpha} - a^2 e^{i alpha} / z^2)``. It is divergence-free and
irrotational, has no normal component on the surface ``|z| = a`` and tends to the inflow
``U (cos alpha, sin alpha)`` far from the body (the disturbance decays like ``a^2 / |z|^2``).

:class:`PotentialFlow` gives the field and the geometry (surface points with their outward
normals, scattered interior points, points on an outer box) as data with a proven reference for
point-cloud models (GINO): the input is the inflow, the output the velocity at query points.

Examples
--------
>>> import torch, constraint_layers as cl
>>> flow = cl.problems.PotentialFlow(radius=0.5)
>>> pts, normals = flow.surface(16)
>>> u = flow.velocity(pts, speed=torch.tensor([1.0]), angle=torch.tensor([0.3]))
>>> float((u[0] * normals).sum(-1).abs().max()) < 1e-12
True
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["PointCloudData", "PotentialFlow"]

F64 = torch.float64


class PointCloudData(NamedTuple):
    """Samples of a point-cloud problem (float64).

    Attributes
    ----------
    points : (P, 2)          the query points (shared by every sample)
    inflow : (batch, 2)      the inflow velocity of each sample (the model input)
    velocity : (batch, P, 2) the exact velocity at the query points
    surface : (P,) bool      the points on the body's surface
    normals : (P, 2)         outward unit normals of the body at surface points (0 elsewhere)
    outer : (P,) bool        the points on the outer box (far field)
    """

    points: Tensor
    inflow: Tensor
    velocity: Tensor
    surface: Tensor
    normals: Tensor
    outer: Tensor


class PotentialFlow:
    """Uniform inflow past a cylinder of radius ``radius`` at the origin.

    Parameters
    ----------
    radius : float, default 0.5
        The cylinder's radius.
    box : float, default 2.0
        The outer box is ``[-box, box]^2``.
    """

    def __init__(self, radius: float = 0.5, box: float = 2.0) -> None:
        if not 0 < radius < box:
            raise ValueError(
                f"PotentialFlow: expected 0 < radius < box, got radius={radius}, box={box}."
            )
        self.radius = float(radius)
        self.box = float(box)

    def velocity(self, points: Tensor, speed: Tensor, angle: Tensor) -> Tensor:
        """The velocity at ``points`` (P, 2) for each inflow (speed, angle: (batch,)); returns
        (batch, P, 2), float64. Points inside the body are refused."""
        p = points.to(F64)
        z = torch.complex(p[:, 0], p[:, 1])
        if bool((z.abs() < self.radius * (1 - 1e-12)).any()):
            raise ValueError("PotentialFlow.velocity: some points lie inside the cylinder.")
        s = speed.to(F64).reshape(-1, 1)
        e = torch.exp(1j * angle.to(F64).reshape(-1, 1))
        dw = s * (e.conj() - self.radius**2 * e / z.unsqueeze(0) ** 2)  # u - i v
        return torch.stack([dw.real, -dw.imag], -1)

    def surface(self, n: int) -> tuple[Tensor, Tensor]:
        """``n`` equally spaced points on the body and their outward unit normals: (n, 2) each."""
        theta = torch.arange(n, dtype=F64) * (2 * math.pi / n)
        normals = torch.stack([theta.cos(), theta.sin()], -1)
        return self.radius * normals, normals

    def outer(self, per_side: int) -> Tensor:
        """``4 * per_side`` points on the outer box, (4 * per_side, 2)."""
        t = torch.arange(per_side, dtype=F64) / per_side * 2 - 1  # [-1, 1)
        b = self.box
        sides = [
            torch.stack([t * b, torch.full_like(t, -b)], -1),
            torch.stack([torch.full_like(t, b), t * b], -1),
            torch.stack([-t * b, torch.full_like(t, b)], -1),
            torch.stack([torch.full_like(t, -b), -t * b], -1),
        ]
        return torch.cat(sides)

    def interior(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` points uniformly at random in the box outside the body, (n, 2)."""
        out = []
        count = 0
        while count < n:
            p = (torch.rand(2 * n, 2, generator=generator, dtype=F64) * 2 - 1) * self.box
            p = p[p.norm(dim=-1) > self.radius * 1.02]
            out.append(p)
            count += len(p)
        return torch.cat(out)[:n]

    def generate(
        self,
        n_samples: int,
        *,
        n_surface: int = 32,
        n_interior: int = 128,
        per_side: int = 8,
        speed: tuple[float, float] = (0.5, 1.5),
        angle: tuple[float, float] = (-math.pi / 6, math.pi / 6),
        seed: int = 0,
        geometry_seed: int = 0,
    ) -> PointCloudData:
        """Samples with random inflow (speed and angle uniform in the ranges given, drawn with
        ``seed``) on one set of query points (the interior ones drawn with ``geometry_seed``):
        the surface, the outer box, then the interior."""
        surf, normals = self.surface(n_surface)
        outer = self.outer(per_side)
        inner = self.interior(n_interior, torch.Generator().manual_seed(geometry_seed))
        g = torch.Generator().manual_seed(seed)
        points = torch.cat([surf, outer, inner])
        s = speed[0] + (speed[1] - speed[0]) * torch.rand(n_samples, generator=g, dtype=F64)
        a = angle[0] + (angle[1] - angle[0]) * torch.rand(n_samples, generator=g, dtype=F64)
        vel = self.velocity(points, s, a)
        P = len(points)
        is_surf = torch.zeros(P, dtype=torch.bool)
        is_surf[:n_surface] = True
        is_outer = torch.zeros(P, dtype=torch.bool)
        is_outer[n_surface : n_surface + len(outer)] = True
        nrm = torch.zeros(P, 2, dtype=F64)
        nrm[:n_surface] = normals
        inflow = torch.stack([s * a.cos(), s * a.sin()], -1)
        return PointCloudData(points, inflow, vel, is_surf, nrm, is_outer)
