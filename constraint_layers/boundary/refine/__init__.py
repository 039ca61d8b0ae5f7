"""Kernel refinement of shift-invariant affine layers (private; used by ``mode="refine"``)."""

from .state import KERNEL_GRADS, Refinement, RefinementContext, _FusedForward, _index

__all__ = ["KERNEL_GRADS", "Refinement", "RefinementContext"]
