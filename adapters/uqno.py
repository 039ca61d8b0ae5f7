"""Adapter for neuraloperator's UQNO (uncertainty quantification neural operator).

``UQNO.forward`` returns ``(solution, quantile)``: the base model's prediction and a pointwise
band ``E(a, x)``, trained with ``neuralop.losses.PointwiseQuantileLoss(alpha)`` to hold the
``(1 - alpha)``-quantile of ``|u - solution|`` (and, after conformal calibration, scaled by a
factor). It is a band, not a variance. This adapter reads it as a Gaussian by a documented
modelling choice: if the error is ``N(0, s^2)`` pointwise, ``P(|error| <= E) = coverage`` gives

    s = scale * E / z,    z = Phi^{-1}((1 + coverage) / 2)     (coverage 0.9: z = 1.645)

The wrapper conditions ``N(solution, diag(s^2))`` on the conservation constraint and returns
``(solution~, quantile~)`` with ``quantile~ = z * s~ / scale`` (the band of the conditioned
Gaussian at the same coverage, in the model's units). For other levels or a calibration factor,
pass ``adapter=UQNOAdapter(coverage=..., scale=...)`` to :class:`.ConservationProjection`.

Examples
--------
>>> import torch, constraint_layers as cl
>>> from neuralop.models import FNO, UQNO
>>> base = FNO(n_modes=(8,), in_channels=1, out_channels=1, hidden_channels=8)
>>> uqno = UQNO(base)
>>> model = cl.wrap(uqno, cl.Conservation.integral(0.0))
>>> u, band = model(torch.randn(2, 1, 32))
>>> float(cl.metrics.conservation_error(u, model.constraints[0]).abs().max()) < 1e-5
True
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

from torch import Tensor

from constraint_layers.functional import Gaussian

from ._registry import register
from .neuralop import NeuralopAdapter

__all__ = ["UQNOAdapter"]


@register("neuralop.models.uqno.UQNO")
class UQNOAdapter(NeuralopAdapter):
    """``UQNO`` outputs ``(solution, quantile)`` read as ``N(solution, (scale * quantile / z)^2)``.

    Parameters
    ----------
    coverage : float, default 0.9
        The band's pointwise coverage ``P(|u - solution| <= band)``; ``1 - alpha`` for a UQNO
        trained with ``PointwiseQuantileLoss(alpha)``.
    scale : float, default 1.0
        Conformal calibration factor multiplying the raw band.
    """

    name = "neuraloperator.UQNO"

    def __init__(self, coverage: float = 0.9, scale: float = 1.0) -> None:
        if not 0 < coverage < 1:
            raise ValueError(f"UQNOAdapter: coverage must lie in (0, 1), got {coverage}.")
        if not scale > 0:
            raise ValueError(f"UQNOAdapter: scale must be positive, got {scale}.")
        self.coverage = float(coverage)
        self.scale = float(scale)
        self.z = NormalDist().inv_cdf((1 + self.coverage) / 2)

    def read(self, output: Any) -> Gaussian:
        where = f"{self.name}.read"
        if not (isinstance(output, tuple) and len(output) == 2):
            raise TypeError(
                f"{where}: expected UQNO's (solution, quantile) pair, got {type(output).__name__}."
            )
        solution, band = output
        if not isinstance(solution, Tensor) or not isinstance(band, Tensor):
            raise TypeError(f"{where}: expected two tensors (solution, quantile).")
        if band.shape != solution.shape:
            raise ValueError(
                f"{where}: the quantile band of shape {tuple(band.shape)} does not match the "
                f"solution's shape {tuple(solution.shape)}."
            )
        var = (band * (self.scale / self.z)).square()
        return Gaussian(solution, var, event_ndim=max(solution.ndim - 1, 1))

    def write(self, output: Any, posterior: Gaussian) -> Any:
        band = posterior.variance.sqrt() * (self.z / self.scale)
        return posterior.mean, band

    def __repr__(self) -> str:
        return f"<adapter {self.name} coverage={self.coverage} scale={self.scale}>"
