"""Output normalisers (private): constraints are stated and enforced in physical units.

A training pipeline often normalises the model's output (neuraloperator's
``UnitGaussianNormalizer``, or a ``DefaultDataProcessor`` holding one as ``out_normalizer``).
The layer un-normalises the prediction (mean, variance, covariance, low-rank factor) before the
projection and normalises the result after it. Only affine normalisers are supported: the
scale is read as ``inverse_transform(1) - inverse_transform(0)``, elementwise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._engine.streaming import flat_event
from ._values import check_finite_now
from .conservation.gaussian import Gaussian

__all__ = ["check_normalizer", "current_normalizer", "from_physical", "to_physical"]


def check_normalizer(obj: object, call: str) -> object:
    """Validate an output normaliser (``transform`` / ``inverse_transform``) or its holder."""
    if obj is None or (hasattr(obj, "transform") and hasattr(obj, "inverse_transform")):
        return obj
    if hasattr(obj, "out_normalizer"):
        return obj
    raise TypeError(
        f"{call}: normalizer must have transform() and inverse_transform() (e.g. neuraloperator's "
        "UnitGaussianNormalizer) or hold one as .out_normalizer (e.g. a DefaultDataProcessor); got "
        f"{type(obj).__name__}."
    )


def current_normalizer(obj: object) -> Any:
    """The normaliser to use now: ``obj`` itself, or ``obj.out_normalizer`` read at this call (so a
    normaliser fitted after wrapping is used)."""
    if obj is None or hasattr(obj, "transform"):
        return obj
    return obj.out_normalizer


def _scale(norm: Any, like: Tensor) -> Tensor:
    """The elementwise scale of an affine ``inverse_transform``: ``inv(1) - inv(0)``."""
    return norm.inverse_transform(torch.ones_like(like)) - norm.inverse_transform(
        torch.zeros_like(like)
    )


def to_physical(g: Gaussian, norm: Any, call: str = "ConstraintLayer") -> tuple[Gaussian, Tensor]:
    s = _scale(norm, g.mean)
    mean = norm.inverse_transform(g.mean)
    what = "normalizer's scale (inverse_transform(1) - inverse_transform(0))"
    check_finite_now(s, call, what)
    if not bool((s.detach() != 0).all()):
        raise ValueError(
            f"{call}: the {what} holds zeros; expected a non-zero scale (a normalizer fitted on "
            "constant data has std 0: add a small eps)."
        )
    check_finite_now(mean, call, "output in physical units (the normalizer's inverse_transform)")
    var = None if g.variance is None else g.variance * s.square()
    sf = flat_event(s, g.event_ndim)
    cov, low = g.covariance, g.low_rank
    if cov is not None:
        cov = cov * (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if low is not None:
        low = low * sf.unsqueeze(-1)
    return g._replace(mean=mean, variance=var, covariance=cov, low_rank=low), s


def from_physical(post: Gaussian, norm: Any, s: Tensor) -> Gaussian:
    mean = norm.transform(post.mean)
    var = None if post.variance is None else post.variance / s.square()
    sf = flat_event(s, post.event_ndim)
    cov, down = post.covariance, post.downdate
    if cov is not None:
        cov = cov / (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if down is not None:
        down = down / sf.unsqueeze(-1)
    # The structured posterior is in physical units: adapters fall back to the record's fields.
    return post._replace(mean=mean, variance=var, covariance=cov, downdate=down, conditioned=None)
