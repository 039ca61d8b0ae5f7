"""``wrap`` and ``unwrap``: add constraints to a model with one call, and take them off again."""

from __future__ import annotations

from typing import Any

from torch import nn

from constraint_layers.layer import ConstraintLayer
from constraint_layers.boundary import BoundaryCorrection

from ._registry import find

__all__ = ["unwrap", "wrap"]


_FAMILIES = ("boundary", "conservation")


def _family(constraint: object) -> str:
    family = getattr(type(constraint), "family", None)
    if family not in _FAMILIES:
        raise TypeError(
            "wrap: expected constraints (cl.Dirichlet, cl.Neumann, cl.Periodic, cl.Conservation), "
            f"got {type(constraint).__name__}."
        )
    return family


def wrap(model: nn.Module, *constraints: Any, **options: Any) -> ConstraintLayer:
    """Add exact constraints to ``model``; returns an ``nn.Module`` wrapping it.

    The adapter registered for the model's type decides how the model is called and where the
    constrained quantity sits in its output; boundary conditions give a
    :class:`~constraint_layers.BoundaryCorrection`, conservation constraints a
    :class:`~constraint_layers.ConservationProjection`.

    Parameters
    ----------
    model : nn.Module
        The model to wrap; ``wrapped.model`` is this very object (not a copy).
    *constraints
        Boundary conditions, or conservation constraints (one family per call).
    **options
        Keyword options of the layer (``spacing``, ``lift``, ``normalizer``, ``mode``, ``noise``,
        ...). ``adapter=`` overrides the registry's choice (e.g. an adapter with settings).

    Returns
    -------
    ConstraintLayer
        The wrapper.

    Raises
    ------
    NoAdapterError
        No adapter is registered for the model's type.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> net = torch.nn.Conv2d(1, 1, 3, padding=1)
    >>> wrapped = cl.wrap(net, cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1))
    >>> wrapped(torch.randn(2, 1, 16, 16)).shape
    torch.Size([2, 1, 16, 16])
    >>> cl.unwrap(wrapped) is net
    True
    """
    if not constraints:
        raise ValueError(
            "wrap: expected at least one constraint after the model, e.g. "
            "cl.wrap(model, cl.Dirichlet(0.0)); got none."
        )
    families: dict[str, list[Any]] = {}
    for c in constraints:
        families.setdefault(_family(c), []).append(c)
    if len(families) > 1:
        raise ValueError(
            "wrap: boundary conditions and conservation constraints in one call are not supported "
            "yet (enforcing both exactly needs a joint projection). Wrap with one family of "
            "constraints per call."
        )
    family, items = next(iter(families.items()))
    adapter = options.pop("adapter", None) or find(model)
    if family == "boundary":
        return BoundaryCorrection(model, items, adapter=adapter, **options)
    from constraint_layers.conservation.constraint import ConservationProjection

    return ConservationProjection(model, items, adapter=adapter, **options)


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The model inside a wrapper: the very object that was wrapped.

    Hooks the wrapper placed on the model (kernel refinement) are removed, so the model behaves
    exactly as before wrapping; its parameters are the same objects, so optimizers stay valid.

    Raises
    ------
    TypeError
        ``wrapped`` is not a constraint layer.
    """
    if not isinstance(wrapped, ConstraintLayer):
        raise TypeError(
            "unwrap: expected a wrapper made by cl.wrap (a BoundaryCorrection or "
            f"ConservationProjection), got {type(wrapped).__name__}."
        )
    return wrapped.release()
