"""Viscous Burgers' equation on the periodic unit interval (the boundary paper's Burgers problems).

``u_t + (u^2 / 2)_x = nu u_xx`` on ``[0, 1)`` periodic, ``nu = 0.1``, initial conditions from the
Gaussian random field ``N(0, 625 (-Laplacian + 25 I)^(-2))`` (:func:`periodic_grf`, truncated at
the solver's dealiased wave numbers).

Solver: Fourier pseudo-spectral on ``solver_points`` nodes, the nonlinear term dealiased with the
2/3 rule, time stepping by ETDRK4 (exponential time differencing, fourth order; Cox & Matthews
2002) with its coefficients computed by contour integrals (Kassam & Trefethen 2005), so the stiff
viscous term is integrated exactly. The output frames are met exactly (each interval between two
frames is split into equal steps no longer than ``dt``), and the solution is evaluated on the output
grid ``linspace(0, 1, N)`` from its Fourier series (spectral interpolation). The mean of ``u`` is
conserved to rounding (the zero mode is untouched by both terms).

Variants (``bc``):

- ``"periodic"``: the data carries no boundary data; the end nodes ``x = 0`` and ``x = 1`` hold the
  same value, bit for bit.
- ``"dirichlet"``: the same solutions, read as a Dirichlet problem on ``[0, 1]``: the data carries
  its own end values per sample and frame (``boundary["x_low"]``, ``boundary["x_high"]``), so a
  Dirichlet constraint can be applied with per-sample, per-frame values.

References
----------
Cox, Matthews. Exponential time differencing for stiff systems. J. Comput. Phys. 176 (2002).
Kassam, Trefethen. Fourth-order time-stepping for stiff PDEs. SIAM J. Sci. Comput. 26 (2005).
Li et al. Fourier neural operator for parametric PDEs. ICLR 2021 (the random initial conditions).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import ReferenceProblem, chunks
from ._checks import as_float64, check_choice, check_float, check_int, check_times
from ._progress import Progress
from .grf import periodic_grf

__all__ = ["Burgers"]

_CONTOUR_POINTS = 32


class Burgers(ReferenceProblem):
    """Viscous Burgers' equation, periodic on ``[0, 1)`` (see the module docstring).

    Parameters
    ----------
    nu : float, default 0.1
        Viscosity.
    bc : "periodic" or "dirichlet"
        Which boundary data the generated data set exposes.
    t_final : float, default 1.0
    grf_scale, grf_shift, grf_power : float, default 625, 25, 2
        The initial-condition field ``N(0, scale (-Laplacian + shift I)^(-power))``.
    grf_modes : int, default 64
        Wave numbers of the initial field (its standard deviation at 64 is 1.5e-4); at most
        ``solver_points // 3``.
    solver_points : int, default 256
        Fourier nodes of the solver (wave numbers up to ``solver_points // 3`` are kept).
    dt : float, default 1e-3
        Largest time step.

    Examples
    --------
    >>> from constraint_layers.problems import Burgers
    >>> data = Burgers(bc="dirichlet").generate(4, task="single", resolution=65, cache=False)
    >>> data.x.shape, data.y.shape, data.boundary["x_low"].shape
    (torch.Size([4, 1, 65]), torch.Size([4, 1, 65]), torch.Size([4, 1]))
    >>> bool((data.y[:, 0, 0] == data.y[:, 0, -1]).all())
    True
    """

    name = "burgers"
    version = 1

    def __init__(
        self,
        nu: float = 0.1,
        bc: str = "periodic",
        t_final: float = 1.0,
        grf_scale: float = 625.0,
        grf_shift: float = 25.0,
        grf_power: float = 2.0,
        grf_modes: int = 64,
        solver_points: int = 256,
        dt: float = 1e-3,
    ) -> None:
        call = "Burgers"
        self.nu = check_float(nu, "nu", call, nonnegative=True)
        self._bc = check_choice(bc, ("periodic", "dirichlet"), "bc", call)
        self.t_final = check_float(t_final, "t_final", call, positive=True)
        self.grf_scale = check_float(grf_scale, "grf_scale", call, nonnegative=True)
        self.grf_shift = check_float(grf_shift, "grf_shift", call, positive=True)
        self.grf_power = check_float(grf_power, "grf_power", call, positive=True)
        self.solver_points = check_int(solver_points, "solver_points", call, minimum=8)
        if self.solver_points % 2:
            raise ValueError(f"{call}: solver_points must be even, got {self.solver_points}.")
        self.dt = check_float(dt, "dt", call, positive=True)
        self.grf_modes = check_int(grf_modes, "grf_modes", call)
        if self.grf_modes > self.n_modes:
            raise ValueError(
                f"{call}: grf_modes ({self.grf_modes}) must not exceed solver_points // 3 "
                f"({self.n_modes}); raise solver_points."
            )

    def __repr__(self) -> str:
        return (
            f"Burgers(nu={self.nu}, bc={self._bc!r}, t_final={self.t_final}, "
            f"solver_points={self.solver_points}, dt={self.dt})"
        )

    @property
    def bc(self) -> str:
        return self._bc

    @property
    def n_modes(self) -> int:
        """Largest wave number kept by the 2/3 dealiasing rule."""
        return self.solver_points // 3

    def config(self) -> dict[str, Any]:
        return {
            "nu": self.nu,
            "bc": self._bc,
            "t_final": self.t_final,
            "grf": [self.grf_scale, self.grf_shift, self.grf_power],
            "grf_modes": self.grf_modes,
        }

    def sizes(self, task: str) -> dict[str, dict[str, int]]:
        paper_res = 128 if self._bc == "periodic" else 500
        paper_n = 600 if task == "single" else 1200
        return {
            "small": {"n": 100, "resolution": 128},
            "paper": {"n": paper_n, "resolution": paper_res},
        }

    def solver_settings(self, resolution: int, times: Tensor) -> dict[str, Any]:
        return {"method": "pseudo-spectral ETDRK4", "points": self.solver_points, "dt": self.dt}

    # ----------------------------------------------------------------------------- solver
    def _wavenumbers(self) -> Tensor:
        return torch.arange(self.solver_points // 2 + 1, dtype=torch.float64)

    def _etd(self, h: float) -> tuple[Tensor, ...]:
        """ETDRK4 coefficients for the step ``h`` (Kassam-Trefethen contour integrals)."""
        lin = -self.nu * (2 * math.pi * self._wavenumbers()) ** 2  # (K,)
        z = (h * lin).to(torch.complex128)
        j = torch.arange(1, _CONTOUR_POINTS + 1, dtype=torch.float64)
        roots = torch.exp(1j * math.pi * (j - 0.5) / _CONTOUR_POINTS)
        lr = z[:, None] + roots[None, :]
        e = torch.exp(lr)
        q = h * ((torch.exp(lr / 2) - 1) / lr).mean(dim=1).real
        f1 = h * ((-4 - lr + e * (4 - 3 * lr + lr**2)) / lr**3).mean(dim=1).real
        f2 = h * ((2 + lr + e * (lr - 2)) / lr**3).mean(dim=1).real
        f3 = h * ((-4 - 3 * lr - lr**2 + e * (4 - lr)) / lr**3).mean(dim=1).real
        return torch.exp(h * lin), torch.exp(h * lin / 2), q, f1, f2, f3

    def _nonlinear(self, v: Tensor) -> Tensor:
        """Dealiased ``-(u^2 / 2)_x`` in Fourier space; ``v`` of shape (n, M // 2 + 1)."""
        m = self.solver_points
        k = self._wavenumbers()
        u = torch.fft.irfft(v, n=m)
        nl = torch.fft.rfft(u * u) * (-0.5j * 2 * math.pi * k)
        nl[:, k > self.n_modes] = 0
        return nl

    def solve_modes(self, v0: Tensor, times: Tensor, *, progress: bool = False) -> Tensor:
        """Advance Fourier coefficients (``torch.fft.rfft`` convention on ``solver_points`` nodes).

        Parameters
        ----------
        v0 : Tensor
            shape: (n, solver_points // 2 + 1), complex128.
        times : Tensor
            shape: (T,); increasing times ``> 0``.

        Returns
        -------
        Tensor
            shape: (n, solver_points // 2 + 1, T), complex128.
        """
        call = "Burgers.solve_modes"
        times = check_times(times, call)
        k = self._wavenumbers()
        v = v0.to(torch.complex128).clone()
        v[:, k > self.n_modes] = 0
        out = torch.empty(*v.shape, times.numel(), dtype=torch.complex128)
        starts = torch.cat([times.new_zeros(1), times[:-1]])
        steps = [max(1, math.ceil(float(b - a) / self.dt - 1e-9)) for a, b in zip(starts, times)]
        coefficients: dict[float, tuple[Tensor, ...]] = {}
        with Progress(sum(steps), "burgers", progress) as bar:
            for i, (a, b, s) in enumerate(zip(starts, times, steps)):
                h = float(b - a) / s
                if h not in coefficients:
                    coefficients[h] = self._etd(h)
                e, e2, q, f1, f2, f3 = coefficients[h]
                for _ in range(s):
                    nv = self._nonlinear(v)
                    a_ = e2 * v + q * nv
                    na = self._nonlinear(a_)
                    b_ = e2 * v + q * na
                    nb = self._nonlinear(b_)
                    c_ = e2 * a_ + q * (2 * nb - nv)
                    nc = self._nonlinear(c_)
                    v = e * v + f1 * nv + 2 * f2 * (na + nb) + f3 * nc
                    bar.update(1)
                if not bool(torch.isfinite(v.real).all()):
                    raise FloatingPointError(
                        f"{call}: the solution stopped being finite before t = {float(b)}; "
                        f"reduce dt (now {self.dt}) or raise solver_points."
                    )
                out[..., i] = v
        return out

    def solve(self, u0: Tensor, times: Tensor, *, progress: bool = False) -> Tensor:
        """Solve from initial values on the solver grid ``x_j = j / solver_points``.

        Parameters
        ----------
        u0 : Tensor
            shape: (n, solver_points); wave numbers above ``solver_points // 3`` are removed.
        times : Tensor
            shape: (T,)

        Returns
        -------
        Tensor
            shape: (n, solver_points, T), float64: the solution on the solver grid.
        """
        u0 = as_float64(u0, "u0", "Burgers.solve")
        if u0.ndim != 2 or u0.shape[1] != self.solver_points:
            raise ValueError(
                f"Burgers.solve: u0 must have shape (n, {self.solver_points}), got "
                f"{tuple(u0.shape)}."
            )
        modes = self.solve_modes(torch.fft.rfft(u0), times, progress=progress)
        return torch.fft.irfft(modes, n=self.solver_points, dim=1)

    def evaluate(self, modes: Tensor, x: Tensor) -> Tensor:
        """The Fourier series of ``modes`` at the points ``x`` (spectral interpolation).

        Parameters
        ----------
        modes : Tensor
            shape: (n, solver_points // 2 + 1, ...), complex (``rfft`` convention).
        x : Tensor
            shape: (X,)

        Returns
        -------
        Tensor
            shape: (n, X, ...), float64.
        """
        x = as_float64(x, "x", "Burgers.evaluate").reshape(-1)
        kept = modes[:, : self.n_modes + 1]
        k = torch.arange(kept.shape[1], dtype=torch.float64)
        weight = torch.full_like(k, 2.0)
        weight[0] = 1.0
        phase = 2 * math.pi * x[:, None] * k[None, :]  # (X, K)
        cos = torch.cos(phase) * weight / self.solver_points
        sin = torch.sin(phase) * weight / self.solver_points
        return torch.einsum("xk,nk...->nx...", cos, kept.real) - torch.einsum(
            "xk,nk...->nx...", sin, kept.imag
        )

    def initial_modes(self, n: int, gen: torch.Generator) -> Tensor:
        """``n`` random initial conditions as ``rfft`` coefficients, shape (n, M // 2 + 1)."""
        m, kmax = self.solver_points, self.grf_modes
        a0, a, b = periodic_grf(
            n,
            kmax,
            scale=self.grf_scale,
            shift=self.grf_shift,
            power=self.grf_power,
            seed=gen,
        )
        v = torch.zeros(n, m // 2 + 1, dtype=torch.complex128)
        v[:, 0] = m * a0
        v[:, 1 : kmax + 1] = 0.5 * m * torch.complex(a, -b)
        return v

    # --------------------------------------------------------------------------- data
    def _generate(
        self, n: int, resolution: int, times: Tensor, gen: torch.Generator, progress: bool
    ) -> dict[str, Tensor]:
        v0 = self.initial_modes(n, gen)
        x = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)
        u = torch.empty(n, resolution, times.numel(), dtype=torch.float64)
        batch = 1024
        with Progress(n, "burgers samples", progress and n > batch) as bar:
            for sl in chunks(n, batch):
                modes = self.solve_modes(v0[sl], times, progress=progress)
                u[sl] = self.evaluate(modes, x)
                bar.update(sl.stop - sl.start)
        u0 = self.evaluate(v0, x)
        # periodic: the two end nodes are the same point
        u[:, -1] = u[:, 0]
        u0[:, -1] = u0[:, 0]
        out = {"u0": u0, "u": u, "coord_x": x}
        if self._bc == "dirichlet":
            out["bc_x_low"] = u[:, 0].clone()
            out["bc_x_high"] = u[:, -1].clone()
        return out
