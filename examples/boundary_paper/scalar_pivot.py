"""The BOON reference's scalar-pivot kernel correction, re-implemented for the record.

This is NOT the library's refinement (``mode="refine"``): it reproduces the pattern of the paper's
reference code, written from the paper's formulas, without the defects listed in
``shared/design/boundary.md`` (right boundary read at index 0, pivot clamp without ``abs``, left
Neumann stencil without ``h``, hard-coded mollifier, unapplied nonlinearity mask, cavity
elimination along x only). It lives in the example, not in the library.

Per spectral convolution ``A(v) = K v + c`` of a neuraloperator FNO, at EVERY call:

1. Probes on full-batch tensors (the reference pattern, recomputed at every call, in the autograd
   graph): ``A(0)``, and for each constrained face ``q`` the response to ``E_q 1`` (every input
   channel set to 1 on the whole face). The pivot ``k(p <- q)`` is the response at face ``p`` read
   from channel 0 of batch item 0 at the first tangential node: ONE scalar per pair of faces, used
   for every channel.
2. Sequential Gaussian elimination (column operations on the boundary inputs), one face after the
   other, so that the boundary rows stop depending on the interior (exactly so only if the
   scalar pivots were the true multi-channel block). With ``L(v) = A(v) - A(0)``: low side
   ``delta_0 = (v_0 - (L v)_0) / k00``, ``v1 = v + E_0 delta_0``; high side with the pivot of the
   eliminated operator ``k'NN = kNN - kN0 k0N / k00``:
   ``delta_N = (v_N - (L v1)_N) / k'NN``, ``v2 = v1 + E_N delta_N - E_0 (k0N / k00) delta_N``.
   Each step costs one more evaluation of the layer on the data. Several constrained axes (the
   cavity): the same along every axis in turn.
3. ``T1``: the boundary rows are written as ``v_B + A(0)_B`` (the layer passes its boundary
   values through, like the library).
4. Pivots whose magnitude is below ``eps`` are clamped to ``sign(k) eps`` (with the ``abs`` that
   the reference lacks).
5. Periodic axes: no elimination; both end nodes of the layer output take their average (one
   evaluation, as in the reference).
6. The FNO blocks' nonlinearity skips the boundary nodes (the mask the reference meant to apply).

The output step (the boundary condition itself) is the library's ``mode="output"`` wrapper, whose
Neumann stencils carry ``h``; no mollifier is applied.

Cost per spectral convolution call: Dirichlet / Neumann on one axis with two sides
``1 + 3 probes + 2 data`` = 6 evaluations instead of 1 (one side: 4); the cavity (two axes, four
faces): 10. The library's refinement caches its probe per optimizer step instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

import constraint_layers as cl

__all__ = ["ScalarPivotRefinement", "attach_scalar_pivots"]


class _MaskedActivation(nn.Module):
    """The FNO blocks' nonlinearity, skipped on the constrained boundary nodes."""

    def __init__(self, act, owner: ScalarPivotRefinement) -> None:
        super().__init__()
        self.act = act
        self._owner = [owner]  # a list: keep the owner out of the module tree

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(x)
        owner = self._owner[0]
        if not owner.active or owner.grid is None:
            return y
        pos = owner.positions(tuple(x.shape[2:]))
        y = y.clone()
        for axis, nodes in pos.items():
            for p in nodes:
                y.select(2 + axis, p).copy_(x.select(2 + axis, p))
        return y


class ScalarPivotRefinement:
    """Scalar-pivot kernel correction hooked on a neuraloperator FNO (see the module docstring).

    Parameters
    ----------
    fno : neuralop FNO
        Modified in place: hooks on ``fno.fno_blocks.convs`` and a masked nonlinearity. Call
        :meth:`remove` to undo.
    bcs : sequence of constraint_layers boundary conditions
        Only their axes, sides and kinds are read (the values are the output step's business).
    eps : float
        Pivot clamp: ``|k| >= eps`` (sign kept).
    """

    def __init__(self, fno: nn.Module, bcs: Sequence[cl.BoundaryCondition], eps: float = 1e-4):
        self.eps = float(eps)
        self.grid: tuple[int, ...] | None = None
        self.active = True
        self.clamped = 0  # how many pivots were clamped (diagnostic)
        self.calls = 0
        #: after the elimination, max |(L v')_B - v_B| / max |v| of the last call (0 if the
        #: scalar pivots were the exact boundary block)
        self.t1_gap = float("nan")
        faces: dict[int, list[str]] = {}
        periodic: set[int] = set()
        for bc in bcs:
            if isinstance(bc, cl.Periodic):
                periodic.add(bc.dim)
                continue
            sides = faces.setdefault(bc.dim, [])
            for s in ("low", "high"):  # low first: the elimination order of the paper
                if s in bc.sides and s not in sides:
                    sides.append(s)
        for d in faces:
            faces[d].sort(key=("low", "high").index)
        self.faces = faces
        self.periodic = sorted(periodic)
        self.fno = fno
        self._handles = [fno.register_forward_pre_hook(self._record_grid)]
        for conv in fno.fno_blocks.convs:
            self._handles.append(conv.register_forward_hook(self._hook))
        blocks = fno.fno_blocks
        self._act = blocks.non_linearity
        blocks.non_linearity = _MaskedActivation(self._act, self)

    # ------------------------------------------------------------------------------- plumbing
    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        blocks = self.fno.fno_blocks
        del blocks.non_linearity  # the masked module; then the original function again
        blocks.non_linearity = self._act

    def _record_grid(self, module: nn.Module, args: tuple) -> None:
        self.grid = tuple(args[0].shape[2:])

    def _pads(self, shape: tuple[int, ...]) -> list[int]:
        if self.grid is None or len(shape) != len(self.grid):
            raise ValueError(f"scalar pivots: layer grid {shape} vs model input grid {self.grid}")
        return [(m - n) // 2 for m, n in zip(shape, self.grid)]

    def positions(self, shape: tuple[int, ...]) -> dict[int, list[int]]:
        """Constrained boundary nodes on the layer grid ``shape``: axis -> node indices."""
        pads = self._pads(shape)
        out: dict[int, list[int]] = {}
        for axis in [*self.faces, *self.periodic]:
            sides = self.faces.get(axis, ["low", "high"])
            out[axis] = [
                pads[axis] if s == "low" else pads[axis] + self.grid[axis] - 1 for s in sides
            ]
        return out

    def _pivot(self, response: Tensor, axis: int, p: int) -> Tensor:
        """Channel 0 of batch item 0, at face node ``p``, first tangential node: a scalar."""
        return self._clamp(response[0, 0].select(axis, p).reshape(-1)[0])

    def _clamp(self, k: Tensor) -> Tensor:
        """``sign(k) * max(|k|, eps)``."""
        sign = torch.where(k >= 0, 1.0, -1.0).to(k)
        small = k.abs() < self.eps
        if bool(small):
            self.clamped += 1
        return torch.where(small, sign * self.eps, k)

    # ----------------------------------------------------------------------------- the hook
    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if not self.active:
            return None
        self.calls += 1
        v = args[0]
        shape = tuple(v.shape[2:])
        pos = self.positions(shape)
        out = output
        if self.periodic:
            out = out.clone()
            for axis in self.periodic:
                lo, hi = pos[axis]
                avg = 0.5 * (out.select(2 + axis, lo) + out.select(2 + axis, hi))
                out.select(2 + axis, lo).copy_(avg)
                out.select(2 + axis, hi).copy_(avg)
        if not self.faces:
            return out
        bias = module.forward(torch.zeros_like(v))  # A(0), full batch (the reference pattern)
        lin = out - bias
        cur = v
        for axis in self.faces:
            a = 2 + axis
            nodes = pos[axis]
            resp = []
            for q in nodes:  # face impulses, every channel set to 1, full batch
                imp = torch.zeros_like(v)
                imp.select(a, q).fill_(1.0)
                resp.append(module.forward(imp) - bias)
            k = [[self._pivot(resp[j], axis, p) for j in range(len(nodes))] for p in nodes]
            # low (or the only) side
            p0 = nodes[0]
            d0 = (v.select(a, p0) - lin.select(a, p0)) / k[0][0]
            step = torch.zeros_like(v)
            step.select(a, p0).copy_(d0)
            cur = cur + step
            lin = module.forward(cur) - bias  # data evaluation
            if len(nodes) == 2:
                p1 = nodes[1]
                k11 = k[1][1] - k[1][0] * k[0][1] / k[0][0]
                k11 = self._clamp(k11)
                d1 = (v.select(a, p1) - lin.select(a, p1)) / k11
                step = torch.zeros_like(v)
                step.select(a, p1).copy_(d1)
                step.select(a, p0).copy_(-(k[0][1] / k[0][0]) * d1)
                cur = cur + step
                lin = module.forward(cur) - bias  # data evaluation
        with torch.no_grad():  # how far the elimination left the boundary rows from v_B
            gap = max(
                float((lin.select(2 + a, p) - v.select(2 + a, p)).abs().max())
                for a in self.faces
                for p in pos[a]
            )
            self.t1_gap = gap / (float(v.abs().max()) + 1e-30)
        out = (lin + bias).clone()
        for axis, nodes in pos.items():  # T1: the boundary rows pass the boundary inputs through
            if axis in self.periodic:
                continue
            for p in nodes:
                out.select(2 + axis, p).copy_(v.select(2 + axis, p) + bias.select(2 + axis, p))
        return out


def attach_scalar_pivots(
    fno: nn.Module, bcs: Sequence[cl.BoundaryCondition], eps: float = 1e-4
) -> ScalarPivotRefinement:
    """Hook the scalar-pivot correction on ``fno`` (in place); returns the hook object."""
    return ScalarPivotRefinement(fno, bcs, eps=eps)
