"""2D incompressible Navier-Stokes in the lid-driven cavity (the boundary paper's 2D problem).

Vorticity-streamfunction form on the unit square, ``Re = 100``:

    w_t + u w_x + v w_y = (1 / Re) (w_xx + w_yy),   -(psi_xx + psi_yy) = w,
    u = psi_y,  v = -psi_x,

with ``psi = 0`` on the walls, no slip on the bottom and side walls and the lid ``u = 1`` at
``y = 1``. Nodes include the walls: ``N`` nodes per axis, spacing ``h = 1 / (N - 1)``; arrays are
indexed ``[..., i, j]`` with ``x = i h`` and ``y = j h`` (``j = N - 1`` is the lid).

Discretisation: second-order central differences for advection and diffusion on the interior;
the Poisson equation solved exactly for the 5-point Laplacian by its sine eigen-decomposition
(two batched ``(N - 2) x (N - 2)`` matrix products each way); the wall vorticity from Thom's
formula, ``w_wall = -2 psi_1 / h^2 - 2 U_wall / h`` (``psi_1`` the stream function one node inside,
``U_wall`` the tangential wall velocity, oriented so that ``U = 1`` on the lid); each corner takes
the mean of its two wall neighbours (the corner values enter no interior stencil). Time stepping is
classical RK4 with the wall vorticity recomputed at every stage; the output frames are met
exactly. Everything is batched over samples.

Initial vorticity: a random smooth field ``sum_{k,l <= K} c_kl sin(k pi x) sin(l pi y)`` with
``c_kl = amplitude * xi_kl / (k^2 + l^2)`` inside, and Thom's wall values of its stream function on
the walls (the input obeys the same wall rule as every output frame).

References
----------
Ghia, Ghia, Shin. High-Re solutions for incompressible flow using the Navier-Stokes equations and
a multigrid method. J. Comput. Phys. 48 (1982) 387-411.
Thom. The flow past circular cylinders at low speeds. Proc. R. Soc. Lond. A 141 (1933).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ._base import ReferenceProblem, chunks
from ._checks import as_float64, check_float, check_int, check_times
from ._progress import Progress
from .grf import sine_series

__all__ = ["Cavity", "poisson_dirichlet"]


def _sine_basis(m: int) -> tuple[Tensor, Tensor]:
    """Orthonormal DST-I matrix ``Q`` (symmetric, ``Q Q = I``) and the eigenvalues of the 1-D
    Dirichlet second difference ``-(u_{j-1} - 2 u_j + u_{j+1})`` on ``m`` interior nodes."""
    j = torch.arange(1, m + 1, dtype=torch.float64)
    q = math.sqrt(2.0 / (m + 1)) * torch.sin(math.pi * j[:, None] * j[None, :] / (m + 1))
    lam = 4.0 * torch.sin(math.pi * j / (2 * (m + 1))) ** 2
    return q, lam


def poisson_dirichlet(rhs: Tensor, h: float) -> Tensor:
    """Solve ``-(5-point Laplacian) psi = rhs`` on the interior nodes, ``psi = 0`` on the walls.

    Parameters
    ----------
    rhs : Tensor
        shape: (..., m, m); the interior nodes of a square grid of spacing ``h``.

    Returns
    -------
    Tensor
        shape: (..., m, m), float64.

    Examples
    --------
    >>> import math, torch
    >>> from constraint_layers.problems.cavity import poisson_dirichlet
    >>> n = 33; h = 1 / (n - 1); s = torch.linspace(0, 1, n, dtype=torch.float64)[1:-1]
    >>> exact = torch.sin(math.pi * s)[:, None] * torch.sin(2 * math.pi * s)[None, :]
    >>> err = (poisson_dirichlet(5 * math.pi**2 * exact, h) - exact).abs().max()
    >>> bool(err < 3e-3)
    True
    """
    rhs = rhs.to(torch.float64)
    m = rhs.shape[-1]
    if rhs.shape[-2] != m:
        raise ValueError(
            f"poisson_dirichlet: expected square interior grids (..., m, m), got "
            f"{tuple(rhs.shape)}."
        )
    q, lam = _sine_basis(m)
    denom = (lam[:, None] + lam[None, :]) / h**2
    return q @ ((q @ rhs @ q) / denom) @ q


class Cavity(ReferenceProblem):
    """Lid-driven cavity at ``Re = 100`` in vorticity-streamfunction form (module docstring).

    Parameters
    ----------
    re : float, default 100
        Reynolds number (lid speed x side / viscosity).
    lid_velocity : float, default 1.0
    t_final : float, default 2.0
    refine : int, default 1
        Simulate on ``refine`` times finer a grid (``(N - 1) refine + 1`` nodes) and return every
        ``refine``-th node.
    dt : float, optional
        Largest time step; default ``min(0.25 Re h^2, 0.4 h / max(1, |lid_velocity|))`` on the
        simulation grid.
    ic_modes : int, default 8
        ``K`` of the random initial vorticity.
    ic_amplitude : float, default 5.0

    Notes
    -----
    The data of ``generate``:

    ``x``: the initial vorticity, ``(n, 1, N, N, T)`` (repeated along ``T``); ``y``: the vorticity
    frames ``(n, 1, N, N, T)``; ``boundary["x_low"]``, ``["x_high"]`` (walls ``x = 0, 1``, shape
    ``(n, 1, N, T)`` over ``(y, t)``), ``["y_low"]``, ``["y_high"]`` (bottom wall and lid, over
    ``(x, t)``): the Dirichlet data (the vorticity on the walls, from the simulation).

    Examples
    --------
    >>> from constraint_layers.problems import Cavity
    >>> data = Cavity().generate(2, resolution=17, cache=False)
    >>> data.x.shape, data.boundary["y_high"].shape
    (torch.Size([2, 1, 17, 17, 25]), torch.Size([2, 1, 17, 25]))
    """

    name = "cavity"
    version = 1
    space_axes = ("x", "y")

    def __init__(
        self,
        re: float = 100.0,
        lid_velocity: float = 1.0,
        t_final: float = 2.0,
        refine: int = 1,
        dt: float | None = None,
        ic_modes: int = 8,
        ic_amplitude: float = 5.0,
    ) -> None:
        call = "Cavity"
        self.re = check_float(re, "re", call, positive=True)
        self.lid_velocity = check_float(lid_velocity, "lid_velocity", call)
        self.t_final = check_float(t_final, "t_final", call, positive=True)
        self.refine = check_int(refine, "refine", call)
        self.dt = None if dt is None else check_float(dt, "dt", call, positive=True)
        self.ic_modes = check_int(ic_modes, "ic_modes", call)
        self.ic_amplitude = check_float(ic_amplitude, "ic_amplitude", call, nonnegative=True)

    def __repr__(self) -> str:
        return (
            f"Cavity(re={self.re}, lid_velocity={self.lid_velocity}, t_final={self.t_final}, "
            f"refine={self.refine}, dt={self.dt}, ic_modes={self.ic_modes}, "
            f"ic_amplitude={self.ic_amplitude})"
        )

    @property
    def bc(self) -> str:
        return "dirichlet"

    def config(self) -> dict[str, Any]:
        return {
            "re": self.re,
            "lid_velocity": self.lid_velocity,
            "t_final": self.t_final,
            "ic_modes": self.ic_modes,
            "ic_amplitude": self.ic_amplitude,
        }

    def sizes(self, task: str) -> dict[str, dict[str, int]]:
        paper_n = 600 if task == "single" else 1200
        return {"small": {"n": 16, "resolution": 50}, "paper": {"n": paper_n, "resolution": 50}}

    def max_dt(self, nodes: int) -> float:
        """The default largest time step on a grid of ``nodes`` per axis."""
        if self.dt is not None:
            return self.dt
        h = 1.0 / (nodes - 1)
        return min(0.25 * self.re * h * h, 0.4 * h / max(1.0, abs(self.lid_velocity)))

    def solver_settings(self, resolution: int, times: Tensor) -> dict[str, Any]:
        nodes = (resolution - 1) * self.refine + 1
        return {
            "method": "vorticity-streamfunction, central FD, Thom walls, RK4",
            "refine": self.refine,
            "dt": self.max_dt(nodes),
        }

    # ----------------------------------------------------------------------------- solver
    def stream_function(self, w: Tensor) -> Tensor:
        """The stream function of the vorticity ``w`` (its interior nodes), zero on the walls.

        Parameters
        ----------
        w : Tensor
            shape: (n, N, N) or (n, N, N, T).

        Returns
        -------
        Tensor
            The shape of ``w``, float64.
        """
        w = as_float64(w, "w", "Cavity.stream_function")
        frames = w.ndim == 4
        if frames:
            w = w.movedim(-1, 1)  # (n, T, N, N)
        nodes = w.shape[-1]
        psi = torch.zeros_like(w)
        psi[..., 1:-1, 1:-1] = poisson_dirichlet(w[..., 1:-1, 1:-1], 1.0 / (nodes - 1))
        return psi.movedim(1, -1) if frames else psi

    def wall_vorticity(self, psi: Tensor, w: Tensor) -> Tensor:
        """Write Thom's wall vorticity of ``psi`` (shape (..., N, N)) into a copy of ``w``."""
        nodes = psi.shape[-1]
        h = 1.0 / (nodes - 1)
        out = w.clone()
        out[..., 0, :] = -2.0 * psi[..., 1, :] / h**2  # x = 0
        out[..., -1, :] = -2.0 * psi[..., -2, :] / h**2  # x = 1
        out[..., :, 0] = -2.0 * psi[..., :, 1] / h**2  # y = 0
        out[..., :, -1] = -2.0 * psi[..., :, -2] / h**2 - 2.0 * self.lid_velocity / h  # lid
        out[..., 0, 0] = 0.5 * (out[..., 1, 0] + out[..., 0, 1])
        out[..., -1, 0] = 0.5 * (out[..., -2, 0] + out[..., -1, 1])
        out[..., 0, -1] = 0.5 * (out[..., 1, -1] + out[..., 0, -2])
        out[..., -1, -1] = 0.5 * (out[..., -2, -1] + out[..., -1, -2])
        return out

    def _complete(self, interior: Tensor, h: float) -> tuple[Tensor, Tensor]:
        """Full-grid stream function and vorticity (Thom walls) from the interior vorticity."""
        n, m = interior.shape[0], interior.shape[-1]
        psi = interior.new_zeros(n, m + 2, m + 2)
        psi[:, 1:-1, 1:-1] = poisson_dirichlet(interior, h)
        w = interior.new_zeros(n, m + 2, m + 2)
        w[:, 1:-1, 1:-1] = interior
        return psi, self.wall_vorticity(psi, w)

    def _rhs(self, interior: Tensor, h: float) -> Tensor:
        psi, w = self._complete(interior, h)
        u = (psi[:, 1:-1, 2:] - psi[:, 1:-1, :-2]) / (2 * h)
        v = -(psi[:, 2:, 1:-1] - psi[:, :-2, 1:-1]) / (2 * h)
        wx = (w[:, 2:, 1:-1] - w[:, :-2, 1:-1]) / (2 * h)
        wy = (w[:, 1:-1, 2:] - w[:, 1:-1, :-2]) / (2 * h)
        lap = (
            w[:, 2:, 1:-1] + w[:, :-2, 1:-1] + w[:, 1:-1, 2:] + w[:, 1:-1, :-2] - 4 * interior
        ) / h**2
        return lap / self.re - u * wx - v * wy

    def solve(self, w0: Tensor, times: Tensor, *, progress: bool = False) -> Tensor:
        """Advance the vorticity from ``w0`` (its interior nodes; the walls follow Thom's rule).

        Parameters
        ----------
        w0 : Tensor
            shape: (n, N, N)
        times : Tensor
            shape: (T,); increasing times ``> 0``.

        Returns
        -------
        Tensor
            shape: (n, N, N, T), float64: the vorticity with Thom wall values at every frame.
        """
        call = "Cavity.solve"
        w0 = as_float64(w0, "w0", call)
        if w0.ndim != 3 or w0.shape[1] != w0.shape[2] or w0.shape[1] < 4:
            raise ValueError(
                f"{call}: w0 must have shape (n, N, N) with N >= 4, got {tuple(w0.shape)}."
            )
        times = check_times(times, call)
        nodes = w0.shape[-1]
        h = 1.0 / (nodes - 1)
        dt_max = self.max_dt(nodes)
        state = w0[:, 1:-1, 1:-1].clone()
        out = torch.empty(*w0.shape, times.numel(), dtype=torch.float64)
        starts = torch.cat([times.new_zeros(1), times[:-1]])
        steps = [max(1, math.ceil(float(b - a) / dt_max - 1e-9)) for a, b in zip(starts, times)]
        with Progress(sum(steps), "cavity", progress) as bar:
            for i, (a, b, s) in enumerate(zip(starts, times, steps)):
                dt = float(b - a) / s
                for _ in range(s):
                    k1 = self._rhs(state, h)
                    k2 = self._rhs(state + 0.5 * dt * k1, h)
                    k3 = self._rhs(state + 0.5 * dt * k2, h)
                    k4 = self._rhs(state + dt * k3, h)
                    state = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
                    bar.update(1)
                if not bool(torch.isfinite(state).all()):
                    raise FloatingPointError(
                        f"{call}: the vorticity stopped being finite before t = {float(b)}; "
                        f"pass a smaller dt (now {dt_max:g})."
                    )
                out[..., i] = self._complete(state, h)[1]
        return out

    def velocity(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Velocities ``(u, v)`` of the vorticity ``w`` (shape (n, N, N)): central differences of
        the stream function inside, the wall velocities (lid ``u = lid_velocity``) on the walls."""
        psi = self.stream_function(w)
        h = 1.0 / (psi.shape[-1] - 1)
        u = torch.zeros_like(psi)
        v = torch.zeros_like(psi)
        u[:, 1:-1, 1:-1] = (psi[:, 1:-1, 2:] - psi[:, 1:-1, :-2]) / (2 * h)
        v[:, 1:-1, 1:-1] = -(psi[:, 2:, 1:-1] - psi[:, :-2, 1:-1]) / (2 * h)
        u[:, :, -1] = self.lid_velocity
        return u, v

    def initial_vorticity(self, coefficients: Tensor, nodes: int) -> Tensor:
        """The initial vorticity of sine coefficients ``c_kl`` (shape (n, K, K)) on ``nodes`` per
        axis, with Thom's wall values: shape (n, nodes, nodes), float64."""
        c = as_float64(coefficients, "coefficients", "Cavity.initial_vorticity")
        s = torch.linspace(0.0, 1.0, nodes, dtype=torch.float64)
        k = torch.arange(1, c.shape[-1] + 1, dtype=torch.float64)
        basis = torch.sin(math.pi * s[:, None] * k[None, :])  # (N, K)
        interior = (basis @ c @ basis.T)[:, 1:-1, 1:-1]
        return self._complete(interior, 1.0 / (nodes - 1))[1]

    # --------------------------------------------------------------------------- data
    def _generate(
        self, n: int, resolution: int, times: Tensor, gen: torch.Generator, progress: bool
    ) -> dict[str, Tensor]:
        coeffs = sine_series(
            n, (self.ic_modes, self.ic_modes), decay=2.0, amplitude=self.ic_amplitude, seed=gen
        )
        nodes = (resolution - 1) * self.refine + 1
        r = self.refine
        w = torch.empty(n, resolution, resolution, times.numel(), dtype=torch.float64)
        w0 = torch.empty(n, resolution, resolution, dtype=torch.float64)
        batch = max(1, 2**21 // nodes**2)
        with Progress(n, "cavity samples", progress and n > batch) as bar:
            for sl in chunks(n, batch):
                full0 = self.initial_vorticity(coeffs[sl], nodes)
                w0[sl] = full0[:, ::r, ::r]
                w[sl] = self.solve(full0, times, progress=progress)[:, ::r, ::r]
                bar.update(sl.stop - sl.start)
        s = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)
        return {
            "u0": w0,
            "u": w,
            "coord_x": s,
            "coord_y": s.clone(),
            "param_coefficients": coeffs,
            "bc_x_low": w[:, 0].clone(),
            "bc_x_high": w[:, -1].clone(),
            "bc_y_low": w[:, :, 0].clone(),
            "bc_y_high": w[:, :, -1].clone(),
        }
