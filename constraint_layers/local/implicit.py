"""The local projections as autograd functions with an implicit backward (private).

Forward: one preconditioned CG solve (:class:`~constraint_layers.local.solve.System`); backward:
one more solve with the same operator, never autograd through the iterations.

- :func:`project_cg`: ``z - W M C^T (C W M C^T)^+ (C z - f)`` (Dirichlet nodes eliminated by the
  mask ``M``, metric ``W``);
- :func:`project_step`: the local rows on the freedom a boundary step ``B(v) = S v + g`` leaves
  (Neumann, periodic or lifted walls).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .operator import LocalOperator
from .solve import System, _scale

__all__ = ["project_cg", "project_step"]


class _Project(torch.autograd.Function):
    """``u~ = z - W M C^T K^+ (C z - f)`` with an implicit backward (one solve with ``K``)."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, f: Tensor, w: Tensor | None, system: System, call: str):
        scale = _scale(system.op, z, f)
        # a right-hand side C z (f = 0, nothing eliminated) is in the range by construction
        lam, it = system.solve(system.op.apply(z) - f, scale, call, check=system.check)
        ctx.system, ctx.call = system, call
        ctx.save_for_backward(lam)
        ctx.iterations = it
        return z - system.move(lam)

    @staticmethod
    @once_differentiable  # a second derivative would need the solve's own derivative
    def backward(ctx: Any, g: Tensor):
        system: System = ctx.system
        (lam,) = ctx.saved_tensors
        cg = system.op.apply(system.mobility(g))
        # C M W g is in the range of C M W C^T by construction: no compatibility check
        mu, _ = system.solve(cg, _scale(system.op, g, cg), ctx.call + " (backward)", check=False)
        ctm = system.op.transpose(mu)
        grad_z = g - ctm
        grad_f = mu
        grad_w = None
        if system.weight is not None and ctx.needs_input_grad[2]:
            ctl = system.op.transpose(lam)
            grad_w = ctl * (ctm - g)
            if system.mask is not None:
                grad_w = grad_w * system.mask.to(grad_w.device)
        return grad_z, grad_f, grad_w, None, None


def project_cg(
    op: LocalOperator,
    z: Tensor,
    f: Tensor,
    *,
    mask: Tensor | None = None,
    weight: Tensor | None = None,
    call: str = "project",
    check: bool = True,
    exact: bool = False,
) -> Tensor:
    """``z - W M C^T (C W M C^T)^+ (C z - f)`` by preconditioned CG (float64 in and out).

    ``z`` (batch, channels, *grid), ``f`` (batch, *grid), ``mask`` (channels, *grid) bool (True:
    free; None: all), ``weight`` (batch, channels, *grid) or None (Euclidean). ``check=False``:
    skip the compatibility checks before CG (the caller knows ``f`` is in the range: ``f = 0``
    with nothing eliminated); an incompatible right-hand side still fails after CG.
    ``exact=True``: a fixed mask (walls) is solved by the cached capacitance solve (see
    :class:`~constraint_layers.local.solve.System`).
    """
    system = System(op, mask, None if weight is None else weight.detach(), exact=exact)
    system.check = check
    return _Project.apply(z, f, weight, system, call)


# ------------------------------------------------------- walls of any kind: the boundary step
class StepSystem(System):
    """``K = C S S^T C^T`` with ``S`` the linear part of a boundary step ``B(v) = S v + g``
    (Neumann, periodic or lifted walls): the local rows act on the freedom the step leaves."""

    def __init__(self, op: LocalOperator, step: Callable[[Tensor], Tensor]) -> None:
        super().__init__(op, None, None)
        self.step = step  # the linear part S (float64, differentiable)

    def step_t(self, y: Tensor) -> Tensor:
        """``S^T y`` (the adjoint of the step, by autograd)."""
        x = torch.zeros_like(y, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self.step(x), x, y)
        return g

    def move(self, lam: Tensor) -> Tensor:
        return self.step_t(self.op.transpose(lam))

    def matvec(self, lam: Tensor) -> Tensor:
        return self.op.apply(self.step(self.move(lam)))


class _ProjectStep(torch.autograd.Function):
    """``v = u - S^T C^T K^+ (C z - f)`` (``z = B(u)``, computed outside), implicit backward."""

    @staticmethod
    def forward(ctx: Any, u: Tensor, z: Tensor, f: Tensor, system: StepSystem, call: str):
        scale = _scale(system.op, z, f)
        lam, _ = system.solve(system.op.apply(z) - f, scale, call, check=False)
        ctx.system, ctx.call = system, call
        return u - system.move(lam)

    @staticmethod
    @once_differentiable  # a second derivative would need the solve's own derivative
    def backward(ctx: Any, g: Tensor):
        system: StepSystem = ctx.system
        cg = system.op.apply(system.step(g))
        mu, _ = system.solve(cg, _scale(system.op, g, cg), ctx.call + " (backward)", check=False)
        return g, -system.op.transpose(mu), mu, None, None


def project_step(
    op: LocalOperator,
    u: Tensor,
    step: Callable[[Tensor], Tensor],
    affine: Callable[[Tensor], Tensor],
    f: Tensor,
    call: str = "project",
    totals: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor] | None = None,
) -> Tensor:
    """``B(u - S^T C^T (C S S^T C^T)^+ (C B(u) - f))``: the local rows on the freedom a boundary
    step ``B = affine`` (linear part ``S = step``) leaves, float64; the walls then hold as the
    step makes them hold. ``totals(v, project0)``: moves ``v`` (before the step) onto the
    totals' rows too, given ``project0`` (``x -> x - S^T C^T K^+ C S x``, the projection onto the
    local rows' null space in the step's variable)."""
    system = StepSystem(op, step)
    v = _ProjectStep.apply(u, affine(u), f, system, call)
    if totals is not None:

        def project0(x: Tensor) -> Tensor:
            zero = torch.zeros((x.shape[0], *op.grid), dtype=x.dtype, device=x.device)
            return _ProjectStep.apply(x, step(x), zero, system, call)

        v = totals(v, project0)
    return affine(v)
