"""Gaussian random fields for initial conditions.

- :func:`periodic_grf`: the field ``N(0, scale * (-Laplacian + shift * I)^(-power))`` on the
  periodic unit interval (the FNO / BOON Burgers initial conditions use ``scale = 625``,
  ``shift = 25``, ``power = 2``), drawn in its Karhunen-Loeve expansion on the Fourier basis ``1``,
  ``sqrt(2) cos(2 pi k x)``, ``sqrt(2) sin(2 pi k x)``, truncated at ``n_modes``. Returned as real
  Fourier coefficients ``u(x) = a0 + sum_k a_k cos(2 pi k x) + b_k sin(2 pi k x)``.
- :func:`sine_series`: random coefficients ``c_k = xi_k * k^(-decay)`` of a sine series (a smooth
  field that vanishes at both ends of an interval), in one or two dimensions.

All draws are float64 and come from the generator given, so a seed reproduces them bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_float, check_int, make_generator

__all__ = ["evaluate_fourier", "periodic_grf", "sine_series"]


def periodic_grf(
    n: int,
    n_modes: int,
    *,
    scale: float = 625.0,
    shift: float = 25.0,
    power: float = 2.0,
    mean: float = 0.0,
    seed: int | torch.Generator = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` fields ``N(mean, scale * (-d^2/dx^2 + shift)^(-power))`` on the periodic
    ``[0, 1)``.

    The eigenvalues of the covariance on ``cos(2 pi k x)``, ``sin(2 pi k x)`` are
    ``scale * ((2 pi k)^2 + shift)^(-power)``; modes above ``n_modes`` are left out.

    Returns
    -------
    a0 : Tensor
        shape: (n,)
    a, b : Tensor
        shape: (n, n_modes); cosine and sine coefficients of wave numbers ``1..n_modes``.

    Examples
    --------
    >>> from constraint_layers.problems import periodic_grf
    >>> a0, a, b = periodic_grf(4000, 8, seed=0)
    >>> a0.shape, a.shape
    (torch.Size([4000]), torch.Size([4000, 8]))
    >>> round(float(a0.std()), 1)  # eigenvalue 625 / 25^2 = 1 for the constant mode
    1.0
    """
    call = "periodic_grf"
    n = check_int(n, "n", call)
    n_modes = check_int(n_modes, "n_modes", call, minimum=0)
    scale = check_float(scale, "scale", call, nonnegative=True)
    shift = check_float(shift, "shift", call, positive=True)
    power = check_float(power, "power", call, positive=True)
    mean = check_float(mean, "mean", call)
    gen = make_generator(seed, call)
    k = torch.arange(0, n_modes + 1, dtype=torch.float64)
    std = torch.sqrt(scale * ((2 * math.pi * k) ** 2 + shift) ** (-power))
    xi = torch.randn(n, 2 * n_modes + 1, generator=gen, dtype=torch.float64)
    a0 = mean + std[0] * xi[:, 0]
    a = math.sqrt(2.0) * std[1:] * xi[:, 1 : n_modes + 1]
    b = math.sqrt(2.0) * std[1:] * xi[:, n_modes + 1 :]
    return a0, a, b


def evaluate_fourier(a0: Tensor, a: Tensor, b: Tensor, x: Tensor) -> Tensor:
    """``a0 + sum_k a_k cos(2 pi k x) + b_k sin(2 pi k x)`` at the points ``x``.

    Parameters
    ----------
    a0 : Tensor
        shape: (n,)
    a, b : Tensor
        shape: (n, K)
    x : Tensor
        shape: (N,)

    Returns
    -------
    Tensor
        shape: (n, N), float64.
    """
    x = x.to(torch.float64)
    k = torch.arange(1, a.shape[-1] + 1, dtype=torch.float64)
    phase = 2 * math.pi * k[:, None] * x[None, :]  # (K, N)
    return (
        a0[:, None]
        + a.to(torch.float64) @ torch.cos(phase)
        + b.to(torch.float64) @ torch.sin(phase)
    )


def sine_series(
    n: int,
    n_modes: int | tuple[int, ...],
    *,
    decay: float = 2.0,
    amplitude: float = 1.0,
    seed: int | torch.Generator = 0,
) -> Tensor:
    """Random sine-series coefficients ``amplitude * xi_k * |k|^(-decay)``, ``xi ~ N(0, 1)``.

    Parameters
    ----------
    n_modes : int or tuple of int
        ``K`` for a 1-D series (wave numbers ``1..K``), ``(Kx, Ky)`` for a 2-D one, where the
        weight is ``(kx^2 + ky^2)^(-decay / 2)``.

    Returns
    -------
    Tensor
        shape: (n, K) or (n, Kx, Ky), float64.

    Examples
    --------
    >>> from constraint_layers.problems import sine_series
    >>> sine_series(3, (4, 5), seed=1).shape
    torch.Size([3, 4, 5])
    """
    call = "sine_series"
    n = check_int(n, "n", call)
    modes = (n_modes,) if isinstance(n_modes, int) else tuple(n_modes)
    modes = tuple(check_int(m, "n_modes", call) for m in modes)
    decay = check_float(decay, "decay", call)
    amplitude = check_float(amplitude, "amplitude", call, nonnegative=True)
    gen = make_generator(seed, call)
    grids = torch.meshgrid(
        *[torch.arange(1, m + 1, dtype=torch.float64) for m in modes], indexing="ij"
    )
    k2 = sum(g**2 for g in grids)
    weight = amplitude * k2 ** (-decay / 2)
    xi = torch.randn(n, *modes, generator=gen, dtype=torch.float64)
    return xi * weight
