"""Heat equation with Neumann walls (the boundary paper's Neumann test problem).

``u_t = k u_xx`` on ``[0, 1]``, an insulated wall ``u_x(t, 0) = 0``, a heater
``u_x(t, 1) = U sin(pi t)``, ``u(0, x) = cos(omega pi x)`` with ``omega ~ U[2.01, 3.99]``,
``k = 0.01``, ``U = 5``.

Solver (exact up to an exponentially convergent series)
--------------------------------------------------------
Lift the boundary data with the time-harmonic solution of the same equation,
``v(t, x) = U Im(exp(i pi t) A(x))``, ``A(x) = cosh(beta x) / (beta sinh beta)``,
``beta = sqrt(i pi / k)``: it satisfies the PDE, ``v_x(t, 0) = 0`` and ``v_x(t, 1) = U sin(pi t)``
exactly. The remainder ``w = u - v`` solves the heat equation with homogeneous Neumann walls, so
``w = sum_n b_n exp(-k n^2 pi^2 t) cos(n pi x)`` with the cosine coefficients of
``w(0, x) = cos(omega pi x) - U Im(A(x))``, both in closed form:

- ``int_0^1 cos(omega pi x) cos(n pi x) dx = (sinc(omega - n) + sinc(omega + n)) / 2``;
- ``int_0^1 A(x) cos(n pi x) dx = (-1)^n / (beta^2 + n^2 pi^2)``.

The series converges like ``exp(-k n^2 pi^2 t)``: ``n_modes`` is chosen so that the first omitted
term is below ``1e-18`` at the earliest requested time (a few hundred modes for the default
frames). ``t = 0`` returns the initial condition itself. The total heat is
``sinc(omega) + (U k / pi)(1 - cos(pi t))`` (the time integral of the flux through the heater).

References
----------
Saad, Gupta, Alizadeh, Maddix. Guiding continuous operator learning through physics-based
boundary constraints. ICLR 2023. arXiv:2212.07477.
"""

from __future__ import annotations

import cmath
import math
from typing import Any

import torch
from torch import Tensor

from ._base import ReferenceProblem, chunks
from ._checks import as_float64, check_float, check_int, check_interval
from ._progress import Progress

__all__ = ["Heat"]

_LOG_TOL = math.log(1e18)
_MAX_MODES = 20000


class Heat(ReferenceProblem):
    """Heat equation on ``[0, 1]``: insulated wall at ``x = 0``, heater ``u_x = U sin(pi t)`` at
    ``x = 1``, initial condition ``cos(omega pi x)``.

    Parameters
    ----------
    k : float, default 0.01
        Diffusivity.
    flux_amplitude : float, default 5.0
        ``U`` in ``u_x(t, 1) = U sin(pi t)``.
    omega_range : (float, float), default (2.01, 3.99)
        ``omega`` is drawn uniformly from this interval, one per sample.
    t_final : float, default 0.5
        The single-step time and the end of the frames.

    Notes
    -----
    The data of ``generate``:

    ``x``: ``u0`` on ``linspace(0, 1, N)``; ``y``: ``u`` at the output times; ``params["omega"]``;
    ``boundary["x_low"] = 0`` and ``boundary["x_high"] = U sin(pi t)``: the OUTWARD-normal
    derivatives (``-u_x(0)`` and ``u_x(1)``), shaped ``(n, 1, T)`` (``(n, 1)`` for a single step).
    The default frames are ``t_j = 0.02 j``, ``j = 1..25`` (t = 0 is left out: ``u0`` is the input
    and does not meet the heater condition). The reference notebook of the paper used the last 25
    of 200 steps in ``[0, 0.5]`` instead; pass ``times`` for that.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers.problems import Heat
    >>> heat = Heat()
    >>> u = heat.solution(torch.tensor([3.0]), torch.tensor([0.25, 0.5]), torch.linspace(0, 1, 5))
    >>> u.shape
    torch.Size([1, 5, 2])
    >>> data = heat.generate(4, task="single", resolution=65, cache=False)
    >>> data.x.shape, data.y.shape, data.boundary["x_high"].shape
    (torch.Size([4, 1, 65]), torch.Size([4, 1, 65]), torch.Size([4, 1]))
    """

    name = "heat"
    version = 1

    def __init__(
        self,
        k: float = 0.01,
        flux_amplitude: float = 5.0,
        omega_range: tuple[float, float] = (2.01, 3.99),
        t_final: float = 0.5,
    ) -> None:
        call = "Heat"
        self.k = check_float(k, "k", call, positive=True)
        self.flux_amplitude = check_float(flux_amplitude, "flux_amplitude", call)
        self.omega_range = check_interval(omega_range, "omega_range", call)
        self.t_final = check_float(t_final, "t_final", call, positive=True)

    def __repr__(self) -> str:
        return (
            f"Heat(k={self.k}, flux_amplitude={self.flux_amplitude}, "
            f"omega_range={self.omega_range}, t_final={self.t_final})"
        )

    @property
    def bc(self) -> str:
        return "neumann"

    def config(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "flux_amplitude": self.flux_amplitude,
            "omega_range": list(self.omega_range),
            "t_final": self.t_final,
        }

    def sizes(self, task: str) -> dict[str, dict[str, int]]:
        if task == "single":
            return {"small": {"n": 100, "resolution": 128}, "paper": {"n": 600, "resolution": 500}}
        return {"small": {"n": 100, "resolution": 128}, "paper": {"n": 1200, "resolution": 1024}}

    def n_modes(self, t_min: float) -> int:
        """Cosine modes needed for the times ``>= t_min > 0`` (first omitted term < 1e-18)."""
        modes = math.ceil(math.sqrt(_LOG_TOL / (self.k * math.pi**2 * t_min))) + 1
        modes = max(modes, math.ceil(self.omega_range[1]) + 32, 64)
        if modes > _MAX_MODES:
            raise ValueError(
                f"Heat: a time of {t_min:g} needs {modes} cosine modes (more than {_MAX_MODES}); "
                "ask for times further from 0."
            )
        return modes

    def solver_settings(self, resolution: int, times: Tensor) -> dict[str, Any]:
        positive = times[times > 0]
        modes = self.n_modes(float(positive.min())) if positive.numel() else 0
        return {"method": "harmonic-lift+cosine-series", "n_modes": modes}

    # ----------------------------------------------------------------------------- physics
    def flux(self, t: Tensor) -> Tensor:
        """The heater flux ``u_x(t, 1) = U sin(pi t)`` (float64, shape of ``t``)."""
        t = as_float64(t, "t", "Heat.flux")
        return self.flux_amplitude * torch.sin(math.pi * t)

    def mass(self, omega: Tensor, t: Tensor) -> Tensor:
        """The total heat ``int_0^1 u dx = sinc(omega) + (U k / pi)(1 - cos(pi t))``.

        Parameters
        ----------
        omega : Tensor
            shape: (n,)
        t : Tensor
            shape: (T,)

        Returns
        -------
        Tensor
            shape: (n, T), float64.
        """
        omega = as_float64(omega, "omega", "Heat.mass").reshape(-1, 1)
        t = as_float64(t, "t", "Heat.mass").reshape(1, -1)
        return torch.sinc(omega) + self.flux_amplitude * self.k / math.pi * (
            1.0 - torch.cos(math.pi * t)
        )

    def initial_condition(self, omega: Tensor, x: Tensor) -> Tensor:
        """``cos(omega pi x)``: shape (n, X), float64."""
        omega = as_float64(omega, "omega", "Heat.initial_condition").reshape(-1, 1)
        x = as_float64(x, "x", "Heat.initial_condition").reshape(1, -1)
        return torch.cos(omega * math.pi * x)

    def solution(
        self, omega: Tensor, t: Tensor, x: Tensor, *, n_modes: int | None = None
    ) -> Tensor:
        """The solution ``u(t, x)`` for each ``omega``.

        Parameters
        ----------
        omega : Tensor
            shape: (n,)
        t : Tensor
            shape: (T,); times ``>= 0``.
        x : Tensor
            shape: (X,); positions in ``[0, 1]``.
        n_modes : int, optional
            Cosine modes of the remainder (default: enough for ``min(t[t > 0])``).

        Returns
        -------
        Tensor
            shape: (n, X, T), float64.
        """
        call = "Heat.solution"
        omega = as_float64(omega, "omega", call).reshape(-1)
        t = as_float64(t, "t", call).reshape(-1)
        x = as_float64(x, "x", call).reshape(-1)
        if (t < 0).any():
            raise ValueError(f"{call}: times must be >= 0, got min {float(t.min())}.")
        positive = t > 0
        if n_modes is None:
            n_modes = self.n_modes(float(t[positive].min())) if positive.any() else 1
        n_modes = check_int(n_modes, "n_modes", call)
        k, amp = self.k, self.flux_amplitude
        beta = cmath.sqrt(1j * math.pi / k)
        # harmonic lift: U Im(exp(i pi t) A(x)), A = cosh(beta x) / (beta sinh beta), written with
        # decaying exponentials only (no overflow for small k)
        xc = x.to(torch.complex128)
        a_x = (torch.exp(beta * (xc - 1)) + torch.exp(-beta * (xc + 1))) / (
            beta * (1 - cmath.exp(-2 * beta))
        )
        phase = torch.exp(1j * math.pi * t.to(torch.complex128))
        lift = amp * (a_x[:, None] * phase[None, :]).imag  # (X, T)
        # cosine coefficients of w(0, x) = cos(omega pi x) - U Im(A(x))
        modes = torch.arange(n_modes, dtype=torch.float64)
        weight = torch.full((n_modes,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        b = 0.5 * weight * (torch.sinc(omega[:, None] - modes) + torch.sinc(omega[:, None] + modes))
        sign = 1.0 - 2.0 * (torch.arange(n_modes) % 2).to(torch.float64)
        a_n = (sign / ((modes * math.pi) ** 2 + 1j * math.pi / k)).imag
        b = b - amp * weight * a_n  # (n, M)
        decay = torch.exp(-k * (modes[:, None] * math.pi) ** 2 * t[None, :])  # (M, T)
        basis = torch.cos(math.pi * x[:, None] * modes[None, :])  # (X, M)
        u = lift + torch.einsum("xm,nmt->nxt", basis, b[:, :, None] * decay[None])
        if not bool(positive.all()):
            u[:, :, ~positive] = self.initial_condition(omega, x)[:, :, None]
        return u

    # --------------------------------------------------------------------------- data
    def _generate(
        self, n: int, resolution: int, times: Tensor, gen: torch.Generator, progress: bool
    ) -> dict[str, Tensor]:
        lo, hi = self.omega_range
        omega = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
        x = torch.linspace(0.0, 1.0, resolution, dtype=torch.float64)
        modes = self.solver_settings(resolution, times)["n_modes"]
        u = torch.empty(n, resolution, times.numel(), dtype=torch.float64)
        batch = max(1, 2**22 // (resolution * times.numel()))
        with Progress(n, "heat", progress) as bar:
            for sl in chunks(n, batch):
                u[sl] = self.solution(omega[sl], times, x, n_modes=modes)
                bar.update(sl.stop - sl.start)
        flux = self.flux(times).expand(n, -1)
        return {
            "u0": self.initial_condition(omega, x),
            "u": u,
            "coord_x": x,
            "param_omega": omega,
            "bc_x_low": torch.zeros(n, times.numel(), dtype=torch.float64),
            "bc_x_high": flux.clone(),
        }
