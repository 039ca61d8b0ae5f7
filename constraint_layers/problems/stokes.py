"""Stokes' second problem (the oscillating plate; the boundary paper's Dirichlet test problem).

``u_t = nu u_xx`` with the plate ``u(t, 0) = U cos(omega t)``. On the half line the periodic
solution is ``U exp(-kappa x) cos(kappa x - omega t)``, ``kappa = sqrt(omega / (2 nu))``.

The data set lives on the finite interval ``[0, L]`` with Dirichlet data at BOTH ends: the plate at
``x = 0`` and, at ``x = L``, the half-line solution's own value ``U exp(-kappa L) cos(kappa L -
omega t)``. The initial condition is the half-line profile at ``t = 0`` plus a random smooth
perturbation that vanishes at both ends, ``p(x) = sum_j c_j sin(j pi x / L)`` with
``c_j = perturbation * U * xi_j / j^2``. The solution on ``[0, L]`` is then, exactly,

    u = U exp(-kappa x) cos(kappa x - omega t) + sum_j c_j exp(-nu (j pi / L)^2 t) sin(j pi x / L)

(the first term meets the PDE and both boundary values, the series solves the homogeneous
Dirichlet problem for the perturbation). Each sample draws ``omega`` and the ``c_j``; the operator
maps ``u0`` to ``u(x, t_1..t_25)`` with ``t_j = 1.2 j / 25`` (the reference notebook's final time
1.2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import ReferenceProblem, chunks
from ._checks import as_float64, check_float, check_int, check_interval
from ._progress import Progress
from .grf import sine_series

__all__ = ["Stokes"]


class Stokes(ReferenceProblem):
    """Stokes' second problem on ``[0, L]`` (Dirichlet at both ends; see the module docstring).

    Parameters
    ----------
    nu : float, default 0.1
        Viscosity.
    amplitude : float, default 1.0
        Plate velocity amplitude ``U``.
    omega_range : (float, float), default (2.0, 6.0)
        Plate frequency, drawn uniformly per sample (a single value with ``(w, w)``).
    length : float, default 1.0
        ``L``.
    t_final : float, default 1.2
    perturbation : float, default 0.5
        Relative size of the random initial perturbation (0: the data is the half-line solution).
    n_modes : int, default 16
        Sine modes of the perturbation.

    Notes
    -----
    The data of ``generate``:

    ``x``: ``u0`` on ``linspace(0, L, N)``; ``y``: ``u``; ``params["omega"]`` (n,),
    ``params["coefficients"]`` (n, n_modes); ``boundary["x_low"]`` and ``boundary["x_high"]``: the
    Dirichlet values at ``x = 0`` and ``x = L``, (n, 1, T) (equal to ``y``'s end nodes bit for bit).

    Examples
    --------
    >>> from constraint_layers.problems import Stokes
    >>> data = Stokes().generate(4, resolution=50, cache=False)
    >>> data.y.shape
    torch.Size([4, 1, 50, 25])
    >>> bool((data.y[:, :, 0] == data.boundary["x_low"]).all())
    True
    """

    name = "stokes"
    version = 1

    def __init__(
        self,
        nu: float = 0.1,
        amplitude: float = 1.0,
        omega_range: tuple[float, float] = (2.0, 6.0),
        length: float = 1.0,
        t_final: float = 1.2,
        perturbation: float = 0.5,
        n_modes: int = 16,
    ) -> None:
        call = "Stokes"
        self.nu = check_float(nu, "nu", call, positive=True)
        self.amplitude = check_float(amplitude, "amplitude", call)
        self.omega_range = check_interval(omega_range, "omega_range", call, positive=True)
        self.length = check_float(length, "length", call, positive=True)
        self.t_final = check_float(t_final, "t_final", call, positive=True)
        self.perturbation = check_float(perturbation, "perturbation", call, nonnegative=True)
        self.n_modes = check_int(n_modes, "n_modes", call)

    def __repr__(self) -> str:
        return (
            f"Stokes(nu={self.nu}, amplitude={self.amplitude}, omega_range={self.omega_range}, "
            f"length={self.length}, t_final={self.t_final}, perturbation={self.perturbation}, "
            f"n_modes={self.n_modes})"
        )

    @property
    def bc(self) -> str:
        return "dirichlet"

    def config(self) -> dict[str, Any]:
        return {
            "nu": self.nu,
            "amplitude": self.amplitude,
            "omega_range": list(self.omega_range),
            "length": self.length,
            "t_final": self.t_final,
            "perturbation": self.perturbation,
            "n_modes": self.n_modes,
        }

    def sizes(self, task: str) -> dict[str, dict[str, int]]:
        if task == "single":
            return {"small": {"n": 100, "resolution": 128}, "paper": {"n": 600, "resolution": 500}}
        return {"small": {"n": 100, "resolution": 128}, "paper": {"n": 1200, "resolution": 500}}

    def solver_settings(self, resolution: int, times: Tensor) -> dict[str, Any]:
        return {"method": "half-line closed form + sine series (exact)"}

    # ----------------------------------------------------------------------------- physics
    def half_line(self, omega: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """The half-line solution ``U exp(-kappa x) cos(kappa x - omega t)``.

        Parameters
        ----------
        omega : Tensor
            shape: (n,)
        t : Tensor
            shape: (T,)
        x : Tensor
            shape: (X,)

        Returns
        -------
        Tensor
            shape: (n, X, T), float64.
        """
        call = "Stokes.half_line"
        omega = as_float64(omega, "omega", call).reshape(-1, 1, 1)
        t = as_float64(t, "t", call).reshape(1, 1, -1)
        x = as_float64(x, "x", call).reshape(1, -1, 1)
        kappa = torch.sqrt(omega / (2 * self.nu))
        return self.amplitude * torch.exp(-kappa * x) * torch.cos(kappa * x - omega * t)

    def solution(self, omega: Tensor, coefficients: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """The solution on ``[0, L]`` for the initial perturbation ``sum_j c_j sin(j pi x / L)``.

        Parameters
        ----------
        omega : Tensor
            shape: (n,)
        coefficients : Tensor
            shape: (n, J). ``c_j`` of the perturbation, ``j = 1..J``.
        t : Tensor
            shape: (T,); times ``>= 0``.
        x : Tensor
            shape: (X,)

        Returns
        -------
        Tensor
            shape: (n, X, T), float64.
        """
        call = "Stokes.solution"
        c = as_float64(coefficients, "coefficients", call)
        if c.ndim != 2:
            raise ValueError(f"{call}: coefficients must have shape (n, J), got {tuple(c.shape)}.")
        t = as_float64(t, "t", call).reshape(-1)
        x = as_float64(x, "x", call).reshape(-1)
        j = torch.arange(1, c.shape[1] + 1, dtype=torch.float64)
        wave = j * math.pi / self.length
        basis = torch.sin(x[:, None] * wave[None, :])  # (X, J)
        decay = torch.exp(-self.nu * wave[:, None] ** 2 * t[None, :])  # (J, T)
        series = torch.einsum("xj,njt->nxt", basis, c[:, :, None] * decay[None])
        return self.half_line(omega, t, x) + series

    def boundary_values(self, omega: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """The Dirichlet data ``(u(t, 0), u(t, L))``, each of shape (n, T)."""
        ends = torch.tensor([0.0, self.length], dtype=torch.float64)
        g = self.half_line(omega, t, ends)
        return g[:, 0], g[:, 1]

    # --------------------------------------------------------------------------- data
    def _generate(
        self, n: int, resolution: int, times: Tensor, gen: torch.Generator, progress: bool
    ) -> dict[str, Tensor]:
        lo, hi = self.omega_range
        omega = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
        coeffs = sine_series(
            n, self.n_modes, decay=2.0, amplitude=self.perturbation * self.amplitude, seed=gen
        )
        x = torch.linspace(0.0, self.length, resolution, dtype=torch.float64)
        zero = torch.zeros(1, dtype=torch.float64)
        u = torch.empty(n, resolution, times.numel(), dtype=torch.float64)
        u0 = torch.empty(n, resolution, dtype=torch.float64)
        batch = max(1, 2**22 // (resolution * times.numel()))
        with Progress(n, "stokes", progress) as bar:
            for sl in chunks(n, batch):
                u[sl] = self.solution(omega[sl], coeffs[sl], times, x)
                u0[sl] = self.solution(omega[sl], coeffs[sl], zero, x)[..., 0]
                bar.update(sl.stop - sl.start)
        low, high = self.boundary_values(omega, times)
        low0, high0 = self.boundary_values(omega, zero)
        # the end nodes take the boundary data exactly (sin(j pi) is 1e-16, not 0, in floats)
        u[:, 0], u[:, -1] = low, high
        u0[:, 0], u0[:, -1] = low0[:, 0], high0[:, 0]
        return {
            "u0": u0,
            "u": u,
            "coord_x": x,
            "param_omega": omega,
            "param_coefficients": coeffs,
            "bc_x_low": low,
            "bc_x_high": high,
        }
