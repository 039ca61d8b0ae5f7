"""Adapter for neuraloperator models (FNO, TFNO, UNO, LocalNO, CODANO, ...).

Imported only when a neuraloperator model is wrapped. It serves every ``BaseModel`` subclass whose
output is a channel-first grid, and fixes neuraloperator's checkpoint trap: ``BaseModel.state_dict``
writes a ``_metadata`` entry (its init kwargs, which can hold functions such as ``F.gelu``) into the
destination without the wrapper's ``model.`` prefix; that key breaks a strict ``load_state_dict`` of
the wrapper and refuses ``torch.load(weights_only=True)``. The hooks below keep the wrapper's
checkpoint pure tensors, and accept a plain neuraloperator state dict (un-prefixed, with or
without ``_metadata``) in ``wrapper.load_state_dict``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._registry import register
from .base import Adapter

__all__ = ["NeuralopAdapter"]

_METADATA = "_metadata"


def _drop_metadata(wrapper: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    # every neuraloperator model inside (a UQNO holds two FNOs) writes its init kwargs under the
    # bare key `_metadata`, whatever its prefix: drop exactly those objects
    kwargs = {id(m._init_kwargs) for m in wrapper.model.modules() if hasattr(m, "_init_kwargs")}
    for key in [k for k, v in state_dict.items() if k.endswith(_METADATA) and id(v) in kwargs]:
        del state_dict[key]


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
    for key in (_METADATA, prefix + _METADATA, prefix + "model." + _METADATA):
        state_dict.pop(key, None)
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


@register("neuralop.models.base_model.BaseModel")
class NeuralopAdapter(Adapter):
    """neuraloperator models: called as ``model(x, ...)``, output ``(batch, channels, *grid)``.

    With ``mode="refine"`` (BOON's kernel refinement) a forward hook on every spectral convolution
    of ``model.fno_blocks`` refines the layer so that its boundary outputs depend only on its
    boundary inputs (see ``constraint_layers._refine``). The hooks act only inside the wrapper's
    own calls, and :func:`constraint_layers.unwrap` removes them.
    """

    name = "neuraloperator"
    supports_refinement = True

    def attach(self, wrapper: nn.Module) -> None:
        wrapper.register_state_dict_post_hook(_drop_metadata)
        wrapper.register_load_state_dict_pre_hook(_accept_plain)
        if getattr(wrapper, "mode", "output") == "refine":
            for conv in _spectral_convs(wrapper.model):
                wrapper.add_refinement(conv)
