"""Closed-form test problems of the conservation paper (ProbConserv, Hansen et al., ICML 2023).

The generalized porous medium equation ``u_t = (k(u) u_x)_x`` with three choices of ``k`` of
growing difficulty, plus the paper's two hyperbolic extras:

=================  ==================  ===========  ===========  =================================
class              parameter           x domain     t range      exact mass ``b(t)``
=================  ==================  ===========  ===========  =================================
Diffusion          k (constant k(u))   [0, 2 pi]    [0, 1]       0
PorousMedium       m (k(u) = u^m)      [0, 1]       [0, 1]       m^(1+1/m) t^(1+1/m) / (m + 1)
Stefan             u* (k = 1[u >= u*]) [0, 1]       [0, 0.1]     2 c1 sqrt(t / pi)
LinearAdvection    a (u_t + a u_x = 0) [0, 1]       [0, 1]       0.5 + min(a t, 0.5)
InviscidBurgers    a (u_t + u u_x = 0) [-1, 1]      [0, 1]       (a / 2) (1 + a t)
=================  ==================  ===========  ===========  =================================

Every class holds its parameter as a float64 tensor (a number or a batch of them).
``solution(t, x)`` and ``mass(t)`` broadcast the parameter, ``t`` and ``x`` together with the usual
torch rules, compute in float64 and return the caller's floating dtype (the default dtype for Python
numbers). For a batch of ``n`` parameters on a grid use :meth:`ClosedForm.on_grid`.

References
----------
Hansen, Maddix, Alizadeh, Gupta, Mahoney. Learning Physical Models that Can Respect Conservation
Laws. ICML 2023. arXiv:2302.11002.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .closed_form import ClosedForm

__all__ = [
    "Diffusion",
    "InviscidBurgers",
    "LinearAdvection",
    "PorousMedium",
    "Stefan",
    "stefan_z1",
]


# ----------------------------------------------------------------------------- the family
class Diffusion(ClosedForm):
    """Heat equation ``u_t = k u_xx`` on the periodic ``[0, 2 pi]``, ``u(0, x) = sin x``.

    ``u = exp(-k t) sin x``; the mass over a period is 0.

    Examples
    --------
    >>> import math, torch
    >>> from constraint_layers.problems import Diffusion
    >>> p = Diffusion(2.0)
    >>> round(float(p.solution(0.5, math.pi / 2)), 6) == round(math.exp(-1.0), 6)
    True
    >>> float(p.mass(0.3))
    0.0
    """

    name = "diffusion"
    param_name = "k"
    domain = (0.0, 2 * math.pi)
    t_range = (0.0, 1.0)
    t_star = 0.5
    TRAIN_RANGE = (1.0, 5.0)
    TEST_PARAMS = (1.0, 5.0)

    def __init__(self, k: float | Tensor) -> None:
        super().__init__(k)

    @property
    def k(self) -> Tensor:
        """The diffusivity."""
        return self.param

    def _check_param(self, p: Tensor, call: str) -> None:
        if (p < 0).any():
            raise ValueError(f"{call}: k must be >= 0, got min {float(p.min())}.")

    def _solution(self, t: Tensor, x: Tensor, p: Tensor) -> Tensor:
        return torch.exp(-p * t) * torch.sin(x)

    def _mass(self, t: Tensor, p: Tensor) -> Tensor:
        return torch.zeros_like(p * t)


class PorousMedium(ClosedForm):
    """Porous medium equation ``u_t = (u^m u_x)_x`` on ``[0, 1]`` with ``u(0, x) = 0`` and the
    boundary value ``u(t, 0) = (m t)^(1/m)``.

    ``u = (m (t - x)_+)^(1/m)``: a front at ``x = t`` (degenerate diffusion), mass
    ``m^(1+1/m) t^(1+1/m) / (m + 1)`` while the front is inside the domain (and the exact integral
    over ``[0, 1]`` after it left).

    Examples
    --------
    >>> from constraint_layers.problems import PorousMedium
    >>> p = PorousMedium(1.0)
    >>> float(p.solution(0.5, 0.25)), float(p.front(0.5)), float(p.mass(0.5))
    (0.25, 0.5, 0.125)
    """

    name = "porous_medium"
    param_name = "m"
    domain = (0.0, 1.0)
    t_range = (0.0, 1.0)
    t_star = 0.5
    TRAIN_RANGE = (1.0, 6.0)
    TEST_PARAMS = (1.0, 3.0, 6.0)

    def __init__(self, m: float | Tensor) -> None:
        super().__init__(m)

    @property
    def m(self) -> Tensor:
        """The exponent of ``k(u) = u^m``."""
        return self.param

    def _check_param(self, p: Tensor, call: str) -> None:
        if (p <= 0).any():
            raise ValueError(f"{call}: m must be > 0, got min {float(p.min())}.")

    def _solution(self, t: Tensor, x: Tensor, p: Tensor) -> Tensor:
        return (p * torch.relu(t - x)) ** (1.0 / p)

    def _mass(self, t: Tensor, p: Tensor) -> Tensor:
        q = 1.0 + 1.0 / p
        return p ** (1.0 / p) / q * (torch.relu(t) ** q - torch.relu(t - 1.0) ** q)

    def front(self, t: Tensor | float) -> Tensor:
        """The front (edge of the support) ``x = t``, independent of ``m``."""
        return self._front_values(t)

    def _front(self, t: Tensor, p: Tensor) -> Tensor:
        return t.clone()


def stefan_z1(u_star: Tensor, iterations: int = 200) -> Tensor:
    """The root ``z1`` in ``(0, 10)`` of ``u* erf(z) z exp(z^2) = (1 - u*) / sqrt(pi)``.

    Vectorised bisection in float64 (the left side is increasing in ``z``); 200 halvings reach the
    spacing of float64.

    Parameters
    ----------
    u_star : Tensor
        Any shape, values in ``(0, 1)``.

    Examples
    --------
    >>> import torch
    >>> from constraint_layers.problems import stefan_z1
    >>> round(2 * float(stefan_z1(torch.tensor(0.6, dtype=torch.float64))), 4)
    1.0513
    """
    u = u_star.to(torch.float64)
    rhs = (1 - u) / math.sqrt(math.pi)

    def f(z: Tensor) -> Tensor:
        return u * torch.erf(z) * z * torch.exp(z * z) - rhs

    lo = torch.zeros_like(u)
    hi = torch.full_like(u, 10.0)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        pos = f(mid) > 0
        hi = torch.where(pos, mid, hi)
        lo = torch.where(pos, lo, mid)
    return 0.5 * (lo + hi)


class Stefan(ClosedForm):
    """Stefan problem as a degenerate GPME: ``k(u) = 1`` if ``u >= u*`` else 0, on ``[0, 1]``,
    ``u(0, x) = 0``, ``u(t, 0) = 1``.

    ``u = 1 - c1 erf(x / (2 sqrt t))`` for ``x <= alpha sqrt t`` and 0 beyond, with ``z1`` the
    root of ``u* erf(z) z exp(z^2) = (1 - u*) / sqrt(pi)`` in ``(0, 10)``, ``alpha = 2 z1`` and
    ``c1 = (1 - u*) / erf(z1)``. The solution jumps from ``u*`` to 0 at the front (the shock);
    the mass is the time integral of the inflow, ``2 c1 sqrt(t / pi)``. At ``t = 0`` the solution is
    0 except at ``x = 0``, where it takes the boundary value 1.

    Examples
    --------
    >>> from constraint_layers.problems import Stefan
    >>> s = Stefan(0.6)
    >>> [round(float(v), 4) for v in (s.alpha, s.c1, s.front(0.05))]
    [1.0513, 0.737, 0.2351]
    >>> round(float(s.mass(0.05)), 5)
    0.18595
    """

    name = "stefan"
    param_name = "u_star"
    domain = (0.0, 1.0)
    t_range = (0.0, 0.1)
    t_star = 0.05
    TRAIN_RANGE = (0.55, 0.7)
    TEST_PARAMS = (0.5, 0.6)

    def __init__(self, u_star: float | Tensor) -> None:
        super().__init__(u_star)
        self.z1 = stefan_z1(self.param)
        self.alpha = 2.0 * self.z1
        self.c1 = (1.0 - self.param) / torch.erf(self.z1)

    @property
    def u_star(self) -> Tensor:
        """The melting threshold ``u*``."""
        return self.param

    def _check_param(self, p: Tensor, call: str) -> None:
        if ((p <= 0) | (p >= 1)).any():
            raise ValueError(
                f"{call}: u_star must lie in (0, 1), got values in [{float(p.min())}, "
                f"{float(p.max())}]."
            )

    def _param_tensors(self) -> tuple[Tensor, ...]:
        return (self.param, self.alpha, self.c1)

    @staticmethod
    def _z(t: Tensor, x: Tensor) -> Tensor:
        safe_t = torch.where(t > 0, t, torch.ones_like(t))
        z = x / (2.0 * torch.sqrt(safe_t))
        at_zero = torch.where(x > 0, torch.full_like(x, math.inf), torch.zeros_like(x))
        return torch.where(t > 0, z, at_zero)

    def _solution(self, t: Tensor, x: Tensor, p: Tensor, alpha: Tensor, c1: Tensor) -> Tensor:
        u = 1.0 - c1 * torch.erf(self._z(t, x))
        return torch.where(x <= alpha * torch.sqrt(torch.relu(t)), u, torch.zeros_like(u))

    def _mass(self, t: Tensor, p: Tensor, alpha: Tensor, c1: Tensor) -> Tensor:
        t = torch.relu(t)
        inflow = 2.0 * c1 * torch.sqrt(t / math.pi)
        # after the front has left [0, 1]: the integral of the profile over [0, 1]
        length = self.domain[1]
        safe_t = torch.where(t > 0, t, torch.ones_like(t))
        inside = length - c1 * (
            length * torch.erf(length / (2 * torch.sqrt(safe_t)))
            + 2.0 * torch.sqrt(safe_t / math.pi) * (torch.exp(-(length**2) / (4 * safe_t)) - 1.0)
        )
        return torch.where(alpha * torch.sqrt(t) <= length, inflow, inside)

    def front(self, t: Tensor | float) -> Tensor:
        """The front ``x = alpha sqrt(t)`` where the solution jumps from ``u*`` to 0."""
        return self._front_values(t)

    def _front(self, t: Tensor, p: Tensor, alpha: Tensor, c1: Tensor) -> Tensor:
        return alpha * torch.sqrt(torch.relu(t))


class LinearAdvection(ClosedForm):
    """Linear advection ``u_t + a u_x = 0`` on ``[0, 1]``, the step ``u(0, x) = 1[x <= 0.5]``,
    inflow ``u(t, 0) = 1``.

    ``u = 1[x - a t <= 0.5]``; mass ``0.5 + min(a t, 0.5)``.

    Examples
    --------
    >>> from constraint_layers.problems import LinearAdvection
    >>> p = LinearAdvection(2.0)
    >>> float(p.solution(0.1, 0.69)), float(p.solution(0.1, 0.71)), round(float(p.mass(0.1)), 6)
    (1.0, 0.0, 0.7)
    """

    name = "linear_advection"
    param_name = "a"
    domain = (0.0, 1.0)
    t_range = (0.0, 1.0)
    t_star = 0.1
    TRAIN_RANGE = (1.0, 5.0)
    TEST_PARAMS = (1.0, 3.0)

    def __init__(self, a: float | Tensor) -> None:
        super().__init__(a)

    @property
    def a(self) -> Tensor:
        """The advection speed."""
        return self.param

    def _check_param(self, p: Tensor, call: str) -> None:
        if (p < 0).any():
            raise ValueError(f"{call}: a must be >= 0, got min {float(p.min())}.")

    def _solution(self, t: Tensor, x: Tensor, p: Tensor) -> Tensor:
        return (x - p * t <= 0.5).to(torch.float64)

    def _mass(self, t: Tensor, p: Tensor) -> Tensor:
        return torch.clamp(0.5 + p * t, 0.0, 1.0)

    def front(self, t: Tensor | float) -> Tensor:
        """The position ``0.5 + a t`` of the jump."""
        return self._front_values(t)

    def _front(self, t: Tensor, p: Tensor) -> Tensor:
        return 0.5 + p * t


class InviscidBurgers(ClosedForm):
    """Inviscid Burgers ``u_t + (u^2 / 2)_x = 0`` on ``[-1, 1]`` with the compressive ramp
    ``u(0, x) = a`` for ``x <= -1``, ``-a x`` on ``[-1, 0]``, 0 for ``x > 0``, inflow ``u = a``.

    Before the break time ``1 / a`` the ramp steepens, ``u = a x / (a t - 1)`` between
    ``a t - 1`` and 0; afterwards a shock from ``a`` to 0 moves at speed ``a / 2`` from ``x = 0``.
    Mass ``(a / 2)(1 + a t)`` until the shock leaves the domain at ``t = 3 / a`` (then ``2 a``).

    Examples
    --------
    >>> from constraint_layers.problems import InviscidBurgers
    >>> p = InviscidBurgers(3.0)
    >>> float(p.front(0.5)), float(p.mass(0.5))
    (0.25, 3.75)
    """

    name = "inviscid_burgers"
    param_name = "a"
    domain = (-1.0, 1.0)
    t_range = (0.0, 1.0)
    t_star = 0.5
    TRAIN_RANGE = (1.0, 4.0)
    TEST_PARAMS = (1.0, 3.0)

    def __init__(self, a: float | Tensor) -> None:
        super().__init__(a)

    @property
    def a(self) -> Tensor:
        """The inflow value (and the slope of the initial ramp)."""
        return self.param

    def _check_param(self, p: Tensor, call: str) -> None:
        if (p <= 0).any():
            raise ValueError(f"{call}: a must be > 0, got min {float(p.min())}.")

    def _solution(self, t: Tensor, x: Tensor, p: Tensor) -> Tensor:
        before = p * t < 1.0
        tail = p * t - 1.0  # left end of the ramp (negative before the break)
        safe = torch.where(before, tail, -torch.ones_like(tail))
        ramp = torch.where(x <= tail, p, torch.where(x <= 0, p * x / safe, torch.zeros_like(x)))
        shock = torch.where(x <= 0.5 * tail, p, torch.zeros_like(x))
        return torch.where(before, ramp, shock)

    def _mass(self, t: Tensor, p: Tensor) -> Tensor:
        return p * torch.clamp(0.5 * (1.0 + p * t), max=2.0)

    def front(self, t: Tensor | float) -> Tensor:
        """The right edge of the support: 0 before the break time ``1 / a``, then the shock
        ``(a t - 1) / 2``."""
        return self._front_values(t)

    def _front(self, t: Tensor, p: Tensor) -> Tensor:
        return torch.clamp(0.5 * (p * t - 1.0), min=0.0)
