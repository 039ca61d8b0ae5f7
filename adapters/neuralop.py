"""Adapter for neuraloperator models (FNO, TFNO, UNO, LocalNO, CODANO, ...).

Imported only when a neuraloperator model is wrapped. It serves every ``BaseModel`` subclass whose
output is a channel-first grid, and fixes neuraloperator's checkpoint trap: ``BaseModel.state_dict``
writes a ``_metadata`` entry (its init kwargs, which can hold functions such as ``F.gelu``) into the
destination without the wrapper's ``model.`` prefix; that key breaks a strict ``load_state_dict`` of
the wrapper and refuses ``torch.load(weights_only=True)``. The hooks below keep the wrapper's
checkpoint pure tensors, and accept a plain neuraloperator state dict (un-prefixed, with or
without ``_metadata``) in ``wrapper.load_state_dict``.

Checkpoints
-----------
A wrapped neuraloperator model offers what neuraloperator's tools call on a model (its
``Trainer`` with ``save_every`` / ``save_best`` / ``resume_from_dir``, and users):

- ``wrapped.save_checkpoint(folder, name)`` writes the model's own neuraloperator checkpoint,
  ``{name}_state_dict.pt`` (pure tensors: ``torch.load`` reads it with ``weights_only=True``)
  and ``{name}_metadata.pkl`` (its init kwargs), plus the sidecar
  ``{name}_constraint_layers.json``: a versioned JSON record of the wrapper (layer class,
  constraints, options) and the fingerprint of the weights it belongs to, its tensors in
  ``{name}_constraint_layers_tensors.pt``. No object of ours is pickled. In output mode,
  plain ``FNO.from_checkpoint(folder, name)`` loads the model; a refine checkpoint marks its
  weights (:data:`REFINE_KEY`) so that plain loading refuses them.
- ``wrapped.load_checkpoint(folder, name)`` loads the weights into the wrapped model, in place;
  the wrapper keeps its own constraints.
- :func:`from_checkpoint` (also ``wrapped.from_checkpoint``) rebuilds the wrapper from these
  files without unpickling code (neuraloperator's pickled ``_metadata.pkl`` is read with
  ``weights_only=True`` and an allowlist of model classes and functions).

The normaliser (``normalizer=``) is the training pipeline's, not part of the wrapper's state:
pass it again to :func:`from_checkpoint`. Constraints with callable values (a lambda) are code,
not data: the sidecar says which, and :func:`from_checkpoint` asks for them.
"""

from __future__ import annotations

import functools
from types import MethodType
from typing import Any

import torch
from torch import nn

from constraint_layers.boundary.spectral import SpectralKernel
from constraint_layers.errors import GridError

from ._registry import compiled_inner, register
from .base import Adapter

__all__ = [
    "LEGACY_SIDECAR_SUFFIX",
    "REFINE_KEY",
    "SIDECAR_SUFFIX",
    "TENSORS_SUFFIX",
    "NeuralopAdapter",
    "NormalisedUnits",
    "from_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
]

_METADATA = "_metadata"


def _drop_metadata_entries(model: nn.Module, state_dict: dict) -> None:
    # every neuraloperator model inside (a UQNO holds two FNOs) writes its init kwargs under the
    # bare key `_metadata`, whatever its prefix: drop exactly those objects
    kwargs = {id(m._init_kwargs) for m in model.modules() if hasattr(m, "_init_kwargs")}
    for key in [k for k, v in state_dict.items() if k.endswith(_METADATA) and id(v) in kwargs]:
        del state_dict[key]


def _drop_metadata(wrapper: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    _drop_metadata_entries(wrapper.model, state_dict)


def _accept_plain(
    wrapper: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    for key in (_METADATA, REFINE_KEY):
        for p in ("", prefix, prefix + "model."):
            state_dict.pop(p + key, None)
    ours = [k for k in state_dict if k.startswith(prefix)]
    if ours and not any(k.startswith(prefix + "model.") for k in ours):
        # a plain checkpoint of the model: its keys lack the wrapper's single prefix
        model_keys = set(wrapper.model.state_dict(keep_vars=True)) - {_METADATA}
        if {k[len(prefix) :] for k in ours} <= model_keys:
            for k in ours:
                state_dict[prefix + "model." + k[len(prefix) :]] = state_dict.pop(k)


def _spectral_convs(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "fno_blocks", None)
    convs = getattr(blocks, "convs", None)
    if convs is None:
        raise ValueError(
            f"mode='refine': {type(model).__name__} has no fno_blocks.convs; kernel refinement "
            "serves neuraloperator's FNO and TFNO (and models built on FNOBlocks). Use "
            "mode='output' for other models."
        )
    return list(convs)


def spectral_kernel(conv: nn.Module, grid: tuple[int, ...]) -> SpectralKernel:
    """The weights of a neuraloperator ``SpectralConv`` at the modes it keeps on ``grid``.

    Follows ``SpectralConv.forward`` (neuraloperator 2.0): ``rfftn`` of the input, the centred
    block of ``n_modes`` frequencies along every axis but the last (after ``fftshift``), the first
    ``n_modes[-1] // 2 + 1`` along the last, the weight sliced from ``max_n_modes`` around its
    centre, ``irfftn`` back, plus the bias. Dense and factorised (Tucker, CP, TT) weights are
    materialised with ``to_tensor()``, differentiably; a separable weight becomes its diagonal.
    """
    name = type(conv).__name__
    if getattr(conv, "complex_data", False):
        raise GridError(f"mode='refine': {name} with complex_data=True is not supported.")
    if getattr(conv, "resolution_scaling_factor", None) is not None:
        raise GridError(
            f"mode='refine': {name} with resolution_scaling_factor changes the grid; a refined "
            "layer must keep it."
        )
    n = len(grid)
    if conv.order != n:
        raise GridError(f"mode='refine': {name} acts on {conv.order} axes, the grid has {n}.")
    if n > 1 and any(m % 2 for m in grid[:-1]):
        odd = [(d, m) for d, m in enumerate(grid[:-1]) if m % 2]
        sizes = ", ".join(f"axis {d}: {m - 1} or {m + 1} instead of {m}" for d, m in odd)
        raise GridError(
            f"mode='refine': {name} is not shift invariant on the grid {tuple(grid)}: with "
            "an odd size along an axis other than the last, neuraloperator 2.0's SpectralConv "
            "applies fftshift twice (fftshift is its own inverse only for even sizes) and moves "
            "every output frequency by one, so the layer is no convolution there and has no "
            f"kernel to refine. Sizes that work: even sizes on the axes other than the last "
            f"({sizes}; this is the layer's grid, after domain padding), any size on the last "
            "axis. Or use mode='output', which is exact at every size."
        )
    fft_size = [*grid[:-1], grid[-1] // 2 + 1]
    starts = [mx - min(size, nm) for size, nm, mx in zip(fft_size, conv.n_modes, conv.max_n_modes)]
    sl = [slice(s // 2, -s // 2) if s else slice(s, None) for s in starts[:-1]]
    sl.append(slice(None, -starts[-1]) if starts[-1] else slice(None))
    weight = conv.weight
    dense = weight if torch.is_tensor(weight) else weight.to_tensor()
    if not dense.is_complex():
        raise TypeError(
            f"mode='refine': the spectral weights of {name} are real ({dense.dtype}), where "
            "neuraloperator's are complex: a cast such as model.to(torch.float64) made them "
            "real and discarded their imaginary parts, so the model is no longer the one trained. "
            "Reload it, and change its precision with .double() (real tensors only; also cast "
            "each complex parameter to torch.complex128 for float64 throughout)."
        )
    if conv.separable:  # (C, *modes): the diagonal of (C, C, *modes)
        dense = torch.diag_embed(dense.movedim(0, -1)).movedim(-2, 0).movedim(-1, 1)
    w = dense[(slice(None), slice(None), *sl)]
    freqs = []
    for d, (size, kept) in enumerate(zip(fft_size, w.shape[2:])):
        if d == n - 1:
            freqs.append(torch.arange(min(kept, size)))
        else:  # centred after fftshift: frequencies -kept//2 .. kept//2 + kept%2 - 1
            f = torch.arange(kept) - kept // 2
            freqs.append(f % size)
    freqs = tuple(f.to(w.device) for f in freqs)
    return SpectralKernel(w, freqs, tuple(grid), conv.bias, exact=_stock_forward(conv))


def _stock_forward(conv: nn.Module) -> bool:
    """Whether ``conv`` computes exactly ``irfftn(W . rfftn(x)) + bias``: neuraloperator's own
    ``SpectralConv.forward`` in full precision (a subclass that overrides ``forward``, or a
    half / mixed precision layer, runs its own forward on the refined input instead)."""
    from neuralop.layers.spectral_convolution import SpectralConv

    return (
        type(conv).forward is SpectralConv.forward
        and getattr(conv, "fno_block_precision", "full") == "full"
    )


@register("neuralop.models.base_model.BaseModel")
class NeuralopAdapter(Adapter):
    """neuraloperator models: called as ``model(x, ...)``, output ``(batch, channels, *grid)``.

    With ``mode="refine"`` (BOON's kernel refinement) a forward hook on every spectral convolution
    of ``model.fno_blocks`` refines the layer so that its boundary outputs depend only on its
    boundary inputs (see ``constraint_layers.boundary.refine``); the layer's boundary block and
    coupling come in closed form from its weights (``spectral_kernel``). A stock
    ``SpectralConv`` in full precision is evaluated in one pass from its weights (its
    ``forward`` replaced by the refinement's while wrapped; parameters and ``state_dict``
    unchanged). The hooks act only inside the wrapper's own calls, and
    :func:`constraint_layers.unwrap` removes them and restores the layer's ``forward``.
    """

    name = "neuraloperator"
    supports_refinement = True

    def attach(self, wrapper: nn.Module) -> None:
        wrapper.register_state_dict_post_hook(_drop_metadata)
        wrapper.register_load_state_dict_pre_hook(_accept_plain)
        wrapper.register_forward_pre_hook(check_trainer_normalizer, with_kwargs=True)
        if getattr(wrapper, "mode", "output") == "refine":
            for conv in _spectral_convs(compiled_inner(wrapper.model)):
                closed = hasattr(conv, "n_modes") and hasattr(conv, "max_n_modes")
                spectrum = functools.partial(spectral_kernel, conv) if closed else None
                wrapper.add_refinement(conv, spectrum=spectrum)

    def wrapper_attribute(self, wrapper: nn.Module, name: str) -> Any:
        """``save_checkpoint`` / ``load_checkpoint`` (bound to the wrapper) and
        ``from_checkpoint``: what neuraloperator's ``Trainer`` and users call on a model."""
        if name in _WRAPPER_METHODS:
            return MethodType(_WRAPPER_METHODS[name], wrapper)
        if name == "from_checkpoint":
            return from_checkpoint
        return super().wrapper_attribute(wrapper, name)


# ------------------------------------------------------------------------------- checkpoints
# in ._neuralop_checkpoint (re-exported here)
from ._neuralop_checkpoint import (  # noqa: E402
    LEGACY_SIDECAR_SUFFIX,
    REFINE_KEY,
    SIDECAR_SUFFIX,
    TENSORS_SUFFIX,
    from_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ._neuralop_checkpoint import WRAPPER_METHODS as _WRAPPER_METHODS  # noqa: E402
from ._neuralop_trainer import NormalisedUnits, check_trainer_normalizer  # noqa: E402
