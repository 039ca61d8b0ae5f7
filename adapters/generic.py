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
  ``MultivariateNormal`` (a subclass, :class:`ConstrainedTorchMultivariateNormal`) whose
  ``scale_tril`` is a triangular root of the exact conditioned covariance, so its samples
  satisfy the constraint to rounding; with noise 0 the posterior is singular, and its
  ``log_prob`` / ``entropy`` are those of the degenerate Gaussian on the constraint set;
- a ``torch.distributions.LowRankMultivariateNormal``: read as diagonal plus low rank. The
  conditioned covariance is no longer of that form, so it comes back as a
  ``MultivariateNormal`` (with ``metric="euclidean"``, which leaves the covariance as it was,
  as a ``LowRankMultivariateNormal``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributions import (
    Independent,
    LowRankMultivariateNormal,
    MultivariateNormal,
    Normal,
)

from constraint_layers.functional import DegenerateGaussian, Gaussian

from ._registry import register
from .base import Adapter

__all__ = ["ConstrainedTorchMultivariateNormal", "ModuleAdapter", "read_gaussian", "write_gaussian"]

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
        tril, root, density = _triangular_root(post, output)  # zero pivots: no lower_cholesky
        out = ConstrainedTorchMultivariateNormal(post.mean, scale_tril=tril, validate_args=False)
        out._density, out._root = density, root
        return out
    raise TypeError(f"write_gaussian: unsupported output type {type(output).__name__}.")


def _prior_root(output: Any) -> Tensor:
    """A root of the model's covariance, shape (*batch, N, K)."""
    if isinstance(output, LowRankMultivariateNormal):
        d = torch.diag_embed(output.cov_diag.sqrt())
        return torch.cat([d, output.cov_factor.expand(*d.shape[:-1], -1)], dim=-1)
    return output.scale_tril


def _triangular_root(
    post: Gaussian, output: Any
) -> tuple[Tensor, Tensor, DegenerateGaussian | None]:
    """A lower-triangular root of the posterior covariance (zero pivots allowed, no gradient),
    the root it comes from (differentiable), both in the mean's dtype, and the degenerate
    density they belong to (None where the covariance is not singular by construction:
    constraint noise).

    Without constraint noise the root ``X`` is the one of the density (its eigenpairs over the
    numerical rank, projected onto ``G u = 0``: one rank cutoff for samples and ``log_prob``);
    with noise it is the exact conditioned root. ``X`` is made triangular by a QR
    factorisation, ``X X^T = R^T R``."""
    cg = post.conditioned
    density = None
    if cg is not None and cg.noise_free:
        density = cg._density()
        X = density.root()
    elif cg is not None:
        X = cg.exact_root(_prior_root(output))
    else:  # no structured posterior (a normaliser in between): the dense matrix's own
        S = output.covariance_matrix.to(torch.float64)
        if post.downdate is not None:
            F = post.downdate.to(torch.float64)
            S = S - F @ F.mT
        density = DegenerateGaussian(post.mean, S, dtype=post.mean.dtype)
        X = density.root()
    with torch.no_grad():  # QR has no derivative here (zero pivots): samples use X itself
        R = torch.linalg.qr(X.mT, mode="r").R[..., : X.shape[-2], :]  # (*batch, N, N) upper
        sign = torch.where(R.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(R.dtype)
    dtype = post.mean.dtype
    return (R * sign.unsqueeze(-1)).mT.to(dtype), X.to(dtype), density


class ConstrainedTorchMultivariateNormal(MultivariateNormal):
    """A ``torch.distributions.MultivariateNormal`` conditioned exactly on ``G u = b``.

    Its ``scale_tril`` is a triangular root of the singular posterior covariance (zero pivots),
    so ``sample`` / ``rsample`` satisfy the constraint to rounding. ``log_prob`` and ``entropy``
    are those of the degenerate Gaussian on its support (the constraint set; pseudo-determinant,
    float64, ``-inf`` off the set), see :class:`~constraint_layers.functional.DegenerateGaussian`;
    torch's own formulas would divide by the zero pivots. ``rsample`` draws ``loc + X eps`` with
    the (non-triangular) root ``X`` the triangular one was made from, the same distribution with
    gradients (QR has no derivative at zero pivots). ``expand`` keeps both (they broadcast over
    batch axes).
    """

    #: The DegenerateGaussian over the event, or None (an ordinary, non-singular posterior).
    _density: DegenerateGaussian | None = None
    #: The differentiable root (shape (*batch, N, K)) samples are drawn with, or None.
    _root: Tensor | None = None

    def rsample(self, sample_shape: torch.Size | Sequence[int] = ()) -> Tensor:
        if self._root is None:
            return super().rsample(sample_shape)
        shape = torch.Size(sample_shape) + self.batch_shape + self._root.shape[-1:]
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + (self._root @ eps.unsqueeze(-1)).squeeze(-1)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._density is None:
            return super().log_prob(value)
        lp = self._density.log_prob(value)
        return lp.to(torch.promote_types(value.dtype, self.loc.dtype))

    def entropy(self) -> Tensor:
        if self._density is None:
            return super().entropy()
        h = self._density.entropy()
        return h.expand(self.batch_shape).to(self.loc.dtype)

    def expand(self, batch_shape: torch.Size, _instance: Any = None) -> MultivariateNormal:
        new = self._get_checked_instance(ConstrainedTorchMultivariateNormal, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._density, new._root = self._density, self._root
        return new


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
