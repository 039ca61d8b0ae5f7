"""The generic adapter: any ``nn.Module`` whose output is a channel-first grid tensor.

For conservation it also reads the common probabilistic heads, and gives back the same kind:

- a tensor: a deterministic mean (projected orthogonally: the HardC baseline);
- a ``(mean, variance)`` tuple (variances, not standard deviations);
- a dict with a mean (``"mean"``, ``"loc"`` or ``"mu"``) and a variance (``"variance"``,
  ``"var"``) or a standard deviation (``"std"``, ``"stddev"``, ``"scale"``, ``"sigma"``); other
  entries pass through unchanged;
- a ``torch.distributions.Normal`` (or ``Independent(Normal)``);
- a ``torch.distributions.MultivariateNormal`` (the event is its last axis; gpytorch's
  ``MultivariateNormal``, a subclass, is read with its lazy covariance): it comes back as a
  ``MultivariateNormal`` whose ``scale_tril`` is a triangular root of the exact conditioned
  covariance, so its samples satisfy the constraint to rounding (noise 0: the posterior is
  singular; its ``log_prob`` is not defined there, use ``wrapped.posterior(x).log_prob``);
- a ``torch.distributions.LowRankMultivariateNormal``: read as diagonal plus low rank. The
  conditioned covariance is no longer of that form, so it comes back as a
  ``MultivariateNormal`` (with ``metric="euclidean"``, which leaves the covariance as it was,
  as a ``LowRankMultivariateNormal``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from constraint_layers.functional import Gaussian

from ._registry import register
from .base import Adapter

__all__ = ["ModuleAdapter", "read_gaussian", "write_gaussian"]

_MEAN_KEYS = ("mean", "loc", "mu")
_VAR_KEYS = ("variance", "var")
_STD_KEYS = ("std", "stddev", "scale", "sigma")


def _tensor(x: object, what: str, where: str, complex_ok: bool = False) -> Tensor:
    if not isinstance(x, Tensor) or not (x.is_floating_point() or (complex_ok and x.is_complex())):
        raise TypeError(
            f"{where}: expected {what} to be a floating-point tensor, got "
            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}."
        )
    return x


def _event_ndim(mean: Tensor) -> int:
    return max(mean.ndim - 1, 1)


def _key(d: dict, keys: tuple[str, ...]) -> str | None:
    found = [k for k in keys if k in d]
    return found[0] if found else None


def read_gaussian(output: Any, where: str = "ModuleAdapter.read") -> Gaussian:
    """Read a tensor, ``(mean, variance)`` tuple, dict or ``Normal`` as a Gaussian record.

    Shapes: the mean is (batch, *event) (grid outputs: (batch, channels, d1, ..., dn)); the
    variance has the mean's shape (or broadcasts to it).
    """
    if isinstance(output, Tensor):
        mean = _tensor(output, "the output", where, complex_ok=True)  # boundary: complex fields
        if mean.ndim < 2:
            raise TypeError(
                f"{where}: expected the model's output to have shape (batch, *event) (a grid: "
                f"(batch, channels, d1, ..., dn)), got shape {tuple(mean.shape)}. Add the missing "
                "axis with unsqueeze."
            )
        return Gaussian(mean, event_ndim=_event_ndim(mean))
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        if len(output) != 2:
            raise TypeError(
                f"{where}: a tuple output must be (mean, variance), got {len(output)} items. "
                "Register an adapter for other layouts (constraint_layers.adapters.register)."
            )
        mean = _tensor(output[0], "the tuple's mean", where)
        var = _tensor(output[1], "the tuple's variance (item 1)", where)
        return Gaussian(mean, _broadcast(var, mean, where), event_ndim=_event_ndim(mean))
    if isinstance(output, dict):
        mk = _key(output, _MEAN_KEYS)
        if mk is None:
            raise TypeError(
                f"{where}: a dict output needs a mean under one of {_MEAN_KEYS}; got keys "
                f"{sorted(map(str, output))}."
            )
        mean = _tensor(output[mk], f"output[{mk!r}]", where)
        vk, sk = _key(output, _VAR_KEYS), _key(output, _STD_KEYS)
        if vk is not None and sk is not None:
            raise TypeError(
                f"{where}: the dict holds both a variance ({vk!r}) and a standard deviation "
                f"({sk!r}); keep one."
            )
        var = None
        if vk is not None:
            var = _tensor(output[vk], f"output[{vk!r}]", where)
        elif sk is not None:
            var = _tensor(output[sk], f"output[{sk!r}]", where).square()
        var = None if var is None else _broadcast(var, mean, where)
        return Gaussian(mean, var, event_ndim=_event_ndim(mean))
    if isinstance(output, Independent) and isinstance(output.base_dist, Normal):
        base = output.base_dist
        return Gaussian(base.loc, base.scale.square(), event_ndim=_event_ndim(base.loc))
    if isinstance(output, Normal):
        return Gaussian(output.loc, output.scale.square(), event_ndim=_event_ndim(output.loc))
    if isinstance(output, LowRankMultivariateNormal):
        return Gaussian(output.loc, output.cov_diag, None, output.cov_factor, event_ndim=1)
    if isinstance(output, MultivariateNormal):
        cov = getattr(output, "lazy_covariance_matrix", None)  # gpytorch: keep it lazy
        if cov is None:
            cov = output.covariance_matrix
        return Gaussian(output.mean, None, cov, event_ndim=1)
    raise TypeError(
        f"{where}: cannot read a Gaussian from a model output of type {type(output).__name__}. "
        "Supported: a tensor (deterministic), a (mean, variance) tuple, a dict with 'mean' and "
        "'variance' or 'std', torch.distributions.Normal, MultivariateNormal, "
        "LowRankMultivariateNormal. Register an adapter for other kinds "
        "(constraint_layers.adapters.register)."
    )


def _broadcast(var: Tensor, mean: Tensor, where: str) -> Tensor:
    try:
        return torch.broadcast_to(var, mean.shape)
    except RuntimeError:
        raise ValueError(
            f"{where}: the variance of shape {tuple(var.shape)} does not broadcast to the mean's "
            f"shape {tuple(mean.shape)}."
        ) from None


def _std(var: Tensor) -> Tensor:
    return var.sqrt()


def write_gaussian(output: Any, post: Gaussian) -> Any:
    """The output of :func:`read_gaussian`'s kind, carrying the posterior."""
    if isinstance(output, Tensor):
        return post.mean
    if isinstance(output, tuple):
        return (post.mean, post.variance)
    if isinstance(output, dict):
        out = dict(output)
        out[_key(output, _MEAN_KEYS)] = post.mean
        vk, sk = _key(output, _VAR_KEYS), _key(output, _STD_KEYS)
        if vk is not None:
            out[vk] = post.variance
        elif sk is not None:
            out[sk] = _std(post.variance)
        return out
    if isinstance(output, Independent):
        return Independent(
            _normal(post, output.base_dist), output.reinterpreted_batch_ndims,
            validate_args=output._validate_args,
        )  # fmt: skip
    if isinstance(output, Normal):
        return _normal(post, output)
    unchanged = post.conditioned is not None and post.conditioned.metric == "euclidean"
    if isinstance(output, LowRankMultivariateNormal) and unchanged:  # only the mean moved
        return LowRankMultivariateNormal(post.mean, output.cov_factor, output.cov_diag)
    if isinstance(output, (MultivariateNormal, LowRankMultivariateNormal)):
        root = _triangular_root(post, output)  # zero pivots: not a valid lower_cholesky
        return MultivariateNormal(post.mean, scale_tril=root, validate_args=False)
    raise TypeError(f"write_gaussian: unsupported output type {type(output).__name__}.")


def _prior_root(output: Any) -> Tensor:
    """A root of the model's covariance, shape (*batch, N, K)."""
    if isinstance(output, LowRankMultivariateNormal):
        d = torch.diag_embed(output.cov_diag.sqrt())
        return torch.cat([d, output.cov_factor.expand(*d.shape[:-1], -1)], dim=-1)
    return output.scale_tril


def _triangular_root(post: Gaussian, output: Any) -> Tensor:
    """A lower-triangular root of the posterior covariance (zero pivots allowed), float64
    algebra, in the mean's dtype: the exact conditioned root ``X`` (``G X = 0`` to rounding)
    made triangular by a QR factorisation, ``X X^T = R^T R``."""
    cg = post.conditioned
    if cg is not None:
        X = cg.exact_root(_prior_root(output))
    else:  # no structured posterior (a normaliser in between): a root of the dense matrix
        S = output.covariance_matrix.to(torch.float64)
        if post.downdate is not None:
            F = post.downdate.to(torch.float64)
            S = S - F @ F.mT
        lam, V = torch.linalg.eigh(0.5 * (S + S.mT))
        X = V * lam.clamp_min(0).sqrt().unsqueeze(-2)
    R = torch.linalg.qr(X.mT, mode="r").R[..., : X.shape[-2], :]  # (*batch, N, N) upper
    sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    return (R * sign.unsqueeze(-1)).mT.to(post.mean.dtype)


def _normal(post: Gaussian, like: Normal) -> Normal:
    scale = _std(post.variance)
    validate = like._validate_args and not bool((scale.detach() == 0).any())
    return Normal(post.mean, scale, validate_args=validate)


@register(nn.Module)
class ModuleAdapter(Adapter):
    """Any ``torch.nn.Module`` called as ``model(x, ...)``; the last resort of the registry.

    It reads a tensor (a deterministic prediction; a grid for boundary conditions), a
    ``(mean, variance)`` tuple, a dict or a ``Normal`` (see the module docstring), for every
    constraint family.
    """

    name = "torch.nn.Module"

    def read(self, output: Any) -> Gaussian:
        return read_gaussian(output, "cl.wrap(model, ...)")

    def write(self, output: Any, prediction: Gaussian) -> Any:
        return write_gaussian(output, prediction)
