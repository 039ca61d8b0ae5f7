"""2D incompressible Navier-Stokes on the torus, vorticity form, pseudo-spectral.

``w_t + u . grad w = nu lap w + f`` on ``[0, L)^2`` (periodic), ``u = (psi_y, -psi_x)`` with
``lap psi = -w`` (so ``w = v_x - u_y`` and ``div u = 0`` exactly in Fourier space).

Solver
------
Fourier-Galerkin in space (``rfft2``, the nonlinear term evaluated on the grid and dealiased
by the 2/3 rule), the integrating-factor fourth-order Runge-Kutta method in time (the viscous
term integrated exactly, ``exp(-nu |k|^2 dt)``; the nonlinear term and the forcing by RK4).
Velocity and vorticity fields are channel-first grids ``(batch, 2, n, n)`` / ``(batch, n, n)``,
axis 0 = ``x``, axis 1 = ``y``, nodes ``x_i = i L / n`` (no repeated end node).

Checks (``tests/local/test_local_navier_stokes.py``): the Taylor-Green vortex
``w = 2 k cos(k x) cos(k y) exp(-2 nu k^2 t)`` (``k = 2 pi m / L``) to rounding; fourth-order
convergence in time; the inviscid invariants (energy, enstrophy) conserved to the time-stepping
error; the energy budget ``dE/dt = -2 nu Z`` with forcing off.

Examples
--------
>>> import math, torch
>>> from constraint_layers.problems import NavierStokes2D
>>> ns = NavierStokes2D(viscosity=0.01, extent=2 * math.pi)
>>> w0 = ns.taylor_green(32, t=0.0)
>>> w1 = ns.solve(w0, t=1.0, dt=0.05)
>>> bool((w1 - ns.taylor_green(32, t=1.0)).abs().max() < 1e-10)
True
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["NavierStokes2D"]

F64 = torch.float64


class NavierStokes2D:
    """The 2D incompressible Navier-Stokes equations in vorticity form on ``[0, L)^2``.

    Parameters
    ----------
    viscosity : float
        ``nu >= 0``.
    extent : float, default 1.0
        The period ``L`` of both axes.
    forcing : Tensor or "li", optional
        A time-independent forcing ``f`` of shape (n, n) or (batch, n, n); ``"li"``: the forcing
        of the neural-operator benchmark (Li et al. 2021),
        ``0.1 (sin(2 pi (x + y) / L) + cos(2 pi (x + y) / L))``.
    """

    def __init__(self, viscosity: float, *, extent: float = 1.0, forcing: Any = None) -> None:
        ok = isinstance(viscosity, (int, float)) and math.isfinite(viscosity)
        if not (ok and viscosity >= 0):
            raise ValueError(f"NavierStokes2D: viscosity must be >= 0, got {viscosity!r}.")
        if not (isinstance(extent, (int, float)) and math.isfinite(extent) and extent > 0):
            raise ValueError(f"NavierStokes2D: extent must be > 0, got {extent!r}.")
        if not (forcing is None or forcing == "li" or isinstance(forcing, Tensor)):
            raise TypeError(
                f"NavierStokes2D: forcing must be None, 'li' or a tensor (n, n), got {forcing!r}."
            )
        self.viscosity = float(viscosity)
        self.extent = float(extent)
        self.forcing = forcing

    # ------------------------------------------------------------------------- the grid
    def coordinates(self, n: int) -> Tensor:
        """The nodes ``i L / n``: shape (n,), float64."""
        return torch.arange(n, dtype=F64) * (self.extent / n)

    def _wavenumbers(self, n: int, device: Any) -> tuple[Tensor, Tensor]:
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=F64, device=device) * (2 * math.pi / self.extent)
        kr = torch.fft.rfftfreq(n, 1.0 / n, dtype=F64, device=device) * (2 * math.pi / self.extent)
        return k.reshape(-1, 1), kr.reshape(1, -1)

    def _dealias(self, n: int, device: Any) -> Tensor:
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=F64, device=device).abs().reshape(-1, 1)
        kr = torch.fft.rfftfreq(n, 1.0 / n, dtype=F64, device=device).reshape(1, -1)
        return (k < n / 3) & (kr < n / 3)

    def _forcing(self, n: int, device: Any) -> Tensor | None:
        if self.forcing is None:
            return None
        if isinstance(self.forcing, Tensor):
            f = self.forcing.to(device=device, dtype=F64)
            if f.shape[-2:] != (n, n):
                raise ValueError(
                    f"NavierStokes2D: the forcing has shape {tuple(f.shape)}; the grid is "
                    f"({n}, {n})."
                )
            return torch.fft.rfft2(f)
        x = self.coordinates(n).to(device)
        s = 2 * math.pi * (x.reshape(-1, 1) + x.reshape(1, -1)) / self.extent
        return torch.fft.rfft2(0.1 * (torch.sin(s) + torch.cos(s)))

    # ------------------------------------------------------------------ fields
    def velocity(self, w: Tensor) -> Tensor:
        """The velocity of a vorticity field (batch, n, n): (batch, 2, n, n), spectrally exact
        and divergence-free (the mean flow is zero)."""
        n = w.shape[-1]
        wh = torch.fft.rfft2(w.to(F64))
        kx, ky = self._wavenumbers(n, w.device)
        k2 = kx.square() + ky.square()
        psi = wh / torch.where(k2 == 0, 1.0, k2)
        psi = torch.where(k2 == 0, 0.0, psi)
        u = torch.fft.irfft2(1j * ky * psi, s=(n, n))
        v = torch.fft.irfft2(-1j * kx * psi, s=(n, n))
        return torch.stack([u, v], -3).to(w.dtype)

    def vorticity(self, u: Tensor) -> Tensor:
        """``v_x - u_y`` of a velocity field (batch, 2, n, n), spectrally: (batch, n, n)."""
        n = u.shape[-1]
        kx, ky = self._wavenumbers(n, u.device)
        uh = torch.fft.rfft2(u.to(F64))
        return torch.fft.irfft2(1j * kx * uh[..., 1, :, :] - 1j * ky * uh[..., 0, :, :], s=(n, n))

    def taylor_green(self, n: int, t: float = 0.0, mode: int = 1) -> Tensor:
        """The exact Taylor-Green vorticity ``2 k cos(k x) cos(k y) exp(-2 nu k^2 t)``,
        ``k = 2 pi mode / L``: shape (1, n, n), float64."""
        k = 2 * math.pi * mode / self.extent
        x = self.coordinates(n)
        w = 2 * k * torch.cos(k * x).reshape(-1, 1) * torch.cos(k * x).reshape(1, -1)
        return (w * math.exp(-2 * self.viscosity * k * k * t)).unsqueeze(0)

    def initial_condition(self, batch: int, n: int, *, seed: int = 0) -> Tensor:
        """Random vorticity ``N(0, 7^3 (-lap + 49)^(-5/2))`` with ``lap`` on the unit torus (the
        initial conditions of the neural-operator benchmark, Li et al. 2021): each Fourier mode
        ``exp(2 pi i k . x)`` has variance ``7^3 (4 pi^2 |k|^2 + 49)^(-5/2)``; the mean and the
        modes the solver does not resolve (``|k_x|`` or ``|k_y| >= n / 3``, the 2/3 rule) are
        zero, so that the inviscid invariants hold to the time-stepping error. Shape
        (batch, n, n), float64."""
        g = torch.Generator().manual_seed(seed)
        k = torch.fft.fftfreq(n, 1.0 / n, dtype=F64).reshape(-1, 1)
        kr = torch.fft.rfftfreq(n, 1.0 / n, dtype=F64).reshape(1, -1)
        lam = (4 * math.pi**2 * (k.square() + kr.square()) + 49.0) ** (-2.5) * 7**3
        noise = torch.complex(
            torch.randn((batch, n, n // 2 + 1), dtype=F64, generator=g),
            torch.randn((batch, n, n // 2 + 1), dtype=F64, generator=g),
        )
        wh = noise * lam.sqrt() * (n * n / math.sqrt(2))
        wh[:, 0, 0] = 0.0
        wh = wh * self._dealias(n, wh.device)  # the modes the solver resolves (2/3 rule)
        return torch.fft.irfft2(wh, s=(n, n))

    # ------------------------------------------------------------------ time stepping
    def _nonlinear(self, wh: Tensor, kx, ky, k2, mask, fh) -> Tensor:
        n = wh.shape[-2]
        psi = torch.where(k2 == 0, 0.0, wh / torch.where(k2 == 0, 1.0, k2))
        u = torch.fft.irfft2(1j * ky * psi, s=(n, n))
        v = torch.fft.irfft2(-1j * kx * psi, s=(n, n))
        wx = torch.fft.irfft2(1j * kx * wh, s=(n, n))
        wy = torch.fft.irfft2(1j * ky * wh, s=(n, n))
        out = -torch.fft.rfft2(u * wx + v * wy) * mask
        return out if fh is None else out + fh

    def solve(self, w0: Tensor, t: float, dt: float, *, record: int | None = None) -> Tensor:
        """Advance the vorticity ``w0`` (batch, n, n) to time ``t`` with steps of at most
        ``dt``; ``record=k``: also return the ``k`` equally spaced snapshots ``t / k, ..., t``
        as (batch, k, n, n). Float64."""
        if w0.ndim != 3 or w0.shape[-1] != w0.shape[-2]:
            raise ValueError(
                f"NavierStokes2D.solve: expected a vorticity field (batch, n, n), got shape "
                f"{tuple(w0.shape)}."
            )
        if not (t >= 0 and dt > 0):
            raise ValueError(f"NavierStokes2D.solve: need t >= 0 and dt > 0, got {t}, {dt}.")
        n = w0.shape[-1]
        frames = 1 if record is None else int(record)
        steps = max(1, math.ceil(t / (frames * dt) - 1e-12)) if t > 0 else 0
        h = t / (frames * steps) if steps else 0.0
        kx, ky = self._wavenumbers(n, w0.device)
        k2 = kx.square() + ky.square()
        mask = self._dealias(n, w0.device)
        fh = self._forcing(n, w0.device)
        e1 = torch.exp(-self.viscosity * k2 * h)
        e2 = torch.exp(-self.viscosity * k2 * h / 2)
        wh = torch.fft.rfft2(w0.to(F64))
        out = []
        for _ in range(frames):
            for _ in range(steps):
                a = h * self._nonlinear(wh, kx, ky, k2, mask, fh)
                b = h * self._nonlinear(e2 * (wh + a / 2), kx, ky, k2, mask, fh)
                c = h * self._nonlinear(e2 * wh + b / 2, kx, ky, k2, mask, fh)
                d = h * self._nonlinear(e1 * wh + e2 * c, kx, ky, k2, mask, fh)
                wh = e1 * wh + (e1 * a + 2 * e2 * (b + c) + d) / 6
            out.append(torch.fft.irfft2(wh, s=(n, n)))
        return out[-1] if record is None else torch.stack(out, 1)

    # ------------------------------------------------------------------ diagnostics
    def energy(self, w: Tensor) -> Tensor:
        """Kinetic energy ``(1/2) mean |u|^2`` per sample: (batch,)."""
        return 0.5 * self.velocity(w).to(F64).square().sum(-3).mean((-2, -1))

    def enstrophy(self, w: Tensor) -> Tensor:
        """``(1/2) mean w^2`` per sample: (batch,)."""
        return 0.5 * w.to(F64).square().mean((-2, -1))
