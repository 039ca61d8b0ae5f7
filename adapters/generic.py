"""The generic adapter: any ``nn.Module`` whose output is a channel-first grid tensor."""

from __future__ import annotations

from torch import nn

from ._registry import register
from .base import Adapter

__all__ = ["ModuleAdapter"]


@register(nn.Module)
class ModuleAdapter(Adapter):
    """Any ``torch.nn.Module`` called as ``model(x, ...)``; the last resort of the registry."""

    name = "torch.nn.Module"
