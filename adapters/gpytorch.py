"""Adapter for gpytorch models (exact and approximate GPs).

Imported only when a gpytorch model is wrapped. The model is CALLED (its ``__call__`` switches
between prior and posterior), in eval mode for predictions, and returns a
``gpytorch.distributions.MultivariateNormal`` over the test points; the wrapper returns one too,
with the conditioned mean and the conditioned covariance kept lazy: the model's covariance
operator minus a rank-``M`` root (``Sigma - F F^T``), so nothing ``N x N`` is formed unless asked.
Its root decomposition is the exact conditioned root, so gpytorch's own ``sample`` and
``rsample`` draw samples that satisfy the constraint to rounding; ``log_prob`` and ``entropy``
are those of the degenerate posterior on the constraint set (see
``ConstrainedMultivariateNormal``).

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
>>> isinstance(f, gpytorch.distributions.MultivariateNormal)
True
>>> abs(float(cl.quadrature.trapezoid(51) @ f.mean.double())) < 1e-6
True
>>> s = f.sample(torch.Size([4]))  # gpytorch's own sampling: every draw conserves
>>> bool((s.double() @ cl.quadrature.trapezoid(51)).abs().max() < 1e-5)
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gpytorch
from linear_operator.operators import ZeroLinearOperator
from torch import nn

from constraint_layers.errors import GridError
from constraint_layers.functional import Gaussian

from ._gpytorch_distributions import ConstraintDroppedWarning, constrained_type
from ._gpytorch_ops import TaskMajor, conditioned_covariance, interleaved, sparse_cross
from ._registry import register
from .base import Adapter

__all__ = ["ConstraintDroppedWarning", "GPyTorchAdapter"]

_MVN = gpytorch.distributions.MultivariateNormal
_MTMVN = gpytorch.distributions.MultitaskMultivariateNormal


def _no_covariance(cov: Any) -> bool:
    """gpytorch's ``skip_posterior_variances()`` gives a zero covariance: nothing to weigh by."""
    return isinstance(cov, ZeroLinearOperator)


@register("gpytorch.models.gp.GP")
class GPyTorchAdapter(Adapter):
    """gpytorch ``GP`` models (``ExactGP``, ``ApproximateGP``) returning a ``MultivariateNormal``
    or a ``MultitaskMultivariateNormal``.

    - The event is the flat vector of test points (batch GPs: leading batch axes); give the
      layer ``grid_shape=`` for the grid they lie on (C order).
    - Multitask outputs ``(*batch, n, tasks)`` are read as channels: ``(*batch, tasks, n)``
      (``Conservation.integral(channels=...)`` selects tasks; ``cl.Conservation(G)`` acts on the
      task-major flat vector ``(tasks, *grid)``), interleaved or not; the result comes back in
      the model's own layout (interleaved when the model's was).
    - The posterior comes back as the same distribution type (a subclass of it:
      ``ConstrainedMultivariateNormal``), with the covariance lazy (``Sigma - F F^T``) and an
      exact root, so gpytorch's ``sample`` / ``rsample`` satisfy the constraint to rounding;
      ``log_prob`` / ``entropy`` are the density on the constraint set (noise 0). It pickles;
      its copies keep the constraint or warn (:class:`ConstraintDroppedWarning`).
    - An exact GP in train mode is evaluated by gpytorch at its training inputs only; at other
      inputs the error says to call ``.eval()``.
    - Under ``gpytorch.settings.skip_posterior_variances()`` there is no covariance: the mean is
      projected in the Euclidean metric (HardC) and the zero covariance comes back as it was.
    """

    name = "gpytorch"

    def call(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        if isinstance(model, gpytorch.models.ApproximateGP) and model.training:
            raise ValueError(
                f"{self.name}: the approximate GP ({type(model).__name__}) is in train mode, "
                "where its variational strategy returns the marginals q(f(x)) for the ELBO, not "
                "a joint posterior that can be conditioned. Call .eval() on the wrapper (or the "
                "model) before predicting; train the plain model (cl.unwrap(wrapped), or "
                "wrapped.model) with its ELBO."
            )
        try:
            return model(*args, **kwargs)
        except RuntimeError as e:
            if not (model.training and "train on the training inputs" in str(e)):
                raise
            raise ValueError(
                f"{self.name}: the exact GP ({type(model).__name__}) is in train mode, where "
                "gpytorch evaluates it only at its training inputs (its prior there, for the "
                'marginal likelihood): "You must train on the training inputs!". Call .eval() '
                "on the wrapper (or the model) before predicting at new inputs."
            ) from e

    def read(self, output: Any) -> Gaussian:
        where = f"{self.name}.read"
        if not isinstance(output, _MVN):
            raise TypeError(
                f"{where}: expected the GP to return a gpytorch.distributions.MultivariateNormal "
                f"(or MultitaskMultivariateNormal), got {type(output).__name__}. (Was the "
                "likelihood applied inside the model?)"
            )
        cov = output.lazy_covariance_matrix
        if isinstance(output, _MTMVN):
            mean = output.mean  # (*batch, n, tasks)
            n, t = mean.shape[-2], mean.shape[-1]
            if _no_covariance(cov):
                cov = None
            elif output._interleaved:
                cov = TaskMajor(cov, n, t)
            return Gaussian(mean.mT, None, cov, None, None, 2)
        if _no_covariance(cov):
            cov = None
        else:
            cov = sparse_cross(cov)
        return Gaussian(output.mean, None, cov, None, None, 1)

    def write(self, output: Any, posterior: Gaussian) -> Any:
        cov = posterior.covariance
        layout = None
        if cov is not None and isinstance(output, _MTMVN) and output._interleaved:
            layout = interleaved(cov, *output.mean.shape[-2:])  # back to the model's order
        if cov is None:  # no covariance was read (skip_posterior_variances): keep the model's
            cov = output.lazy_covariance_matrix
        elif posterior.downdate is not None:
            var = posterior.variance
            var = (
                None
                if var is None
                else var.reshape(*var.shape[: var.ndim - posterior.event_ndim], -1)
            )
            cov = conditioned_covariance(
                cov, posterior.downdate, posterior.conditioned, var, layout=layout
            )
        elif layout is not None:
            cov = layout[0]
        cls = constrained_type(type(output))
        if isinstance(output, _MTMVN):
            out = cls(posterior.mean.mT, cov, interleaved=output._interleaved)
        else:
            out = cls(posterior.mean, cov)
        if posterior.downdate is not None:
            out._conditioned = posterior.conditioned
        return out

    def constrain(self, output: Any, project: Callable[[Gaussian], Gaussian]) -> Any:
        g = self.read(output)
        try:
            post = project(g)
        except GridError as e:
            if "grid_shape" in str(e) or g.event_ndim != 1:
                raise
            raise GridError(
                f"{e} A gpytorch GP returns one flat vector of test points ({g.mean.shape[-1]} "
                "here): give the grid they lie on (C order) with cl.wrap(gp, ..., "
                "grid_shape=(d1, ..., dn))."
            ) from None
        return self.write(output, post)
