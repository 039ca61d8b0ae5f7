"""Adapter for gpytorch models (exact and approximate GPs).

Imported only when a gpytorch model is wrapped. The model is CALLED (its ``__call__`` switches
between prior and posterior), in eval mode for predictions, and returns a
``gpytorch.distributions.MultivariateNormal`` over the test points; the wrapper returns one too,
with the conditioned mean and the conditioned covariance kept lazy: the model's covariance
operator minus a rank-``M`` root (``Sigma - F F^T``), so nothing ``N x N`` is formed unless asked.

The test points are the flat event: for a GP evaluated on a grid of ``(t, x)`` points flattened in
C order, pass ``grid_shape=(T, X)`` to the layer so that ``Conservation.integral(dim=1)``
integrates over ``x`` per time ``t``.

Examples
--------
>>> import torch, gpytorch, constraint_layers as cl
>>> class GP(gpytorch.models.ExactGP):
...     def __init__(self, x, y):
...         super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
...         self.mean_module = gpytorch.means.ZeroMean()
...         self.covar_module = gpytorch.kernels.RBFKernel()
...     def forward(self, x):
...         mean, covar = self.mean_module(x), self.covar_module(x)
...         return gpytorch.distributions.MultivariateNormal(mean, covar)
>>> x = torch.linspace(0, 1, 8)
>>> gp = GP(x, torch.sin(6 * x)).eval()
>>> model = cl.wrap(gp, cl.Conservation.integral(0.0))  # zero mean value on [0, 1]
>>> with torch.no_grad():
...     f = model(torch.linspace(0, 1, 51))
>>> type(f).__name__, abs(float(cl.quadrature.trapezoid(51) @ f.mean.double())) < 1e-6
('MultivariateNormal', True)
"""

from __future__ import annotations

from typing import Any

import gpytorch
from linear_operator.operators import LowRankRootLinearOperator

from constraint_layers.conservation.conserve import Gaussian

from ._registry import register
from .base import Adapter

__all__ = ["GPyTorchAdapter"]


@register("gpytorch.models.gp.GP")
class GPyTorchAdapter(Adapter):
    """gpytorch ``GP`` models (``ExactGP``, ``ApproximateGP``) returning a ``MultivariateNormal``.

    The event is the flat vector of test points (batch GPs: leading batch axes). Multitask
    outputs are not supported yet (their covariance interleaves tasks).
    """

    name = "gpytorch"

    def read(self, output: Any) -> Gaussian:
        where = f"{self.name}.read"
        if isinstance(output, gpytorch.distributions.MultitaskMultivariateNormal):
            raise TypeError(
                f"{where}: multitask GP outputs (MultitaskMultivariateNormal) are not supported; "
                "constrain each task's MultivariateNormal, or state the constraint on the "
                "interleaved flat output with a custom adapter."
            )
        if not isinstance(output, gpytorch.distributions.MultivariateNormal):
            raise TypeError(
                f"{where}: expected the GP to return a gpytorch.distributions.MultivariateNormal, "
                f"got {type(output).__name__}. (Was the likelihood applied inside the model?)"
            )
        return Gaussian(output.mean, None, output.lazy_covariance_matrix, None, None, 1)

    def write(self, output: Any, posterior: Gaussian) -> Any:
        cov = posterior.covariance
        if posterior.downdate is not None:
            root = posterior.downdate.to(dtype=cov.dtype, device=cov.device)
            cov = cov + LowRankRootLinearOperator(root).mul(-1.0)
        return type(output)(posterior.mean, cov)
