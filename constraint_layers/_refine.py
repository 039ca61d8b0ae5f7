"""Kernel refinement of shift-invariant affine layers (private; used by ``mode="refine"``).

BOON refines every Fourier layer ``A(v) = K v + c`` of a neural operator so that the layer's
boundary outputs depend only on its boundary inputs: ``K -> T1 K T2``, where ``T2`` (column
operations: an update of the boundary inputs) removes the coupling of the boundary rows to the
interior and ``T1`` (row operations) writes the boundary rows. With ``L(v) = A(v) - A(0)`` and
``K_BB`` the block of ``L`` from the boundary nodes to themselves:

    T2:  v'_B = v_B + K_BB^+ (v_B - (L v)_B),  v'_I = v_I      (then (L v')_B = v_B if exact)
    T1:  A~(v)_B = v_B + A(0)_B,               A~(v)_I = A(v')_I

so the refined layer passes its boundary values through (plus its bias) whatever the interior
holds, and its interior outputs see the boundary update ``L(E_B delta)``.

How it is computed, for a layer that is a circular convolution on its grid (a spectral convolution
is one, on the padded grid inside an FNO):

- One batched evaluation of the layer on ``C`` unit impulses (one per input channel) at a single
  node, plus one zero input, gives the impulse response; by shift invariance it holds every block of
  ``L`` the refinement needs. This probe and the solve operator built from it are cached and
  recomputed only when the layer's parameters change (their version counters): once per optimizer
  step in training, never in inference. They are treated as constants in backpropagation (like a
  preconditioner): gradients are exact for the refined layer at fixed ``K_BB^+``.
- The faces of one axis are coupled along the tangential axes by a convolution, so ``K_BB`` is
  block diagonal in the tangential Fourier basis: one ``(S C) x (S C)`` system per tangential
  frequency (``S`` = number of constrained sides), factorised in float64.
- ``L(E_B delta)``: on 1D grids, a small matrix product with the cached impulse responses at the
  faces (frozen with the probe); on grids with tangential axes, one more evaluation of the layer on
  the face-supported update, batched with a zero input for ``A(0)``.

Ill-conditioned ``K_BB`` (the rule, not the exception: a smooth kernel sees the two end nodes of a
periodic grid almost alike; measured smallest relative singular values 1e-5 to 1e-11 at paper
sizes): ``K_BB^+ = (K^H K + lam^2 I)^{-1} K^H`` with ``lam = rcond * max singular value`` over all
frequencies. Directions far above ``lam`` are inverted to rounding, those near or below it are
damped instead of blowing up; ``T1`` keeps the boundary rows exact either way. The smallest relative
singular value seen is kept in :attr:`Refinement.stats`.

Several constrained axes (a 2D cavity): ``T2`` runs one axis after the other (a joint solve over
the whole frame of faces is a dense system too large to factorise at every step); ``T1`` writes the
boundary rows of every face, so the decoupling of the boundary rows is exact for every axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import GridError

__all__ = ["Refinement", "RefinementContext"]


@dataclass
class RefinementContext:
    """What the hooks need to know about the current call (set by the wrapper around it)."""

    active: bool = False
    #: The physical grid shape of the call (the model input's spatial shape).
    grid: tuple[int, ...] | None = None
    #: Constrained faces: spatial axis -> sides, in the order of refinement.
    faces: dict[int, tuple[str, ...]] = field(default_factory=dict)


class _Probe:
    """Impulse response of one layer at one grid, dtype and device."""

    def __init__(self, layer: Callable[[Tensor], Tensor], like: Tensor, origin: tuple[int, ...]):
        """Evaluate ``layer`` (call without gradients) on impulses at ``origin``."""
        c = like.shape[1]
        grid = like.shape[2:]
        batch = torch.zeros((c + 1, c, *grid), dtype=like.dtype, device=like.device)
        idx = torch.arange(c, device=like.device)
        batch[(idx, idx, *origin)] = 1.0
        out = layer(batch)  # shape: (C + 1, C_out, *grid)
        if out.shape[2:] != grid:
            raise GridError(
                "mode='refine': a refined layer must keep its grid (got input grid "
                f"{tuple(grid)}, output grid {tuple(out.shape[2:])}); layers that resample "
                "(resolution_scaling_factor, output_shape, UNO scalings) are not supported."
            )
        if out.shape[1] != c:
            raise GridError(
                "mode='refine': a refined layer must map C channels to C channels (its boundary "
                f"outputs become its boundary inputs), got {c} -> {out.shape[1]}."
            )
        self.bias = out[c:]  # A(0), shape: (1, C, *grid)
        self.response = out[:c] - self.bias  # L(e_ci at origin), shape: (C_in, C_out, *grid)
        self.origin = origin
        self.ops: dict[tuple, Tensor] = {}  # per (axis, face positions): the K_BB solve operator
        self._faces: dict[tuple, Tensor] = {}

    def face_responses(self, axis: int, pos: tuple[int, ...]) -> Tensor:
        """Responses to impulses at the face nodes ``pos``: (S, C_in, C_out, *grid)."""
        key = (axis, pos)
        if key not in self._faces:
            a = 2 + axis
            self._faces[key] = torch.stack(
                [torch.roll(self.response, p - self.origin[axis], dims=a) for p in pos]
            )
        return self._faces[key]


class Refinement:
    """Forward hook that refines one shift-invariant affine layer (see the module docstring).

    Parameters
    ----------
    context : RefinementContext
        Shared with the wrapper, which switches it on around its own calls only: the model called
        on its own is not refined.
    rcond : float
        Relative Tikhonov parameter of the ``K_BB`` solve.
    """

    def __init__(self, context: RefinementContext, rcond: float = 1e-2) -> None:
        self.context = context
        self.rcond = rcond
        self._cache: tuple[tuple, _Probe] | None = None
        #: Diagnostics: smallest singular value of K_BB relative to the largest, per axis
        #: (frequencies where the layer does not respond at all left out).
        self.stats: dict[int, float] = {}
        #: How far the T2 update left the boundary rows from the boundary inputs before T1 wrote
        #: them, relative to max |v| (rounding when K_BB is well conditioned and rcond small).
        self.t1_gap: float = float("nan")

    # -------------------------------------------------------------------------------- probe
    def _probe(self, module: torch.nn.Module, v: Tensor, origin: tuple[int, ...]) -> _Probe:
        key = (
            tuple(v.shape[1:]),
            v.dtype,
            v.device,
            origin,
            tuple((id(p), p._version) for p in module.parameters()),
        )
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            probe = _Probe(module.forward, v, origin)
        self._cache = (key, probe)
        return probe

    # ---------------------------------------------------------------------------- the hook
    def __call__(self, module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        ctx = self.context
        if not ctx.active or not ctx.faces:
            return None
        v = args[0]
        grid = tuple(v.shape[2:])
        phys = ctx.grid
        if tuple(output.shape[2:]) != grid:
            raise GridError(
                "mode='refine': a refined layer must keep its grid (got input grid "
                f"{grid}, output grid {tuple(output.shape[2:])})."
            )
        if phys is None or len(phys) != len(grid):
            raise GridError(
                f"mode='refine': the layer sees a {len(grid)}-d grid {grid} but the model "
                f"input's grid is {phys}."
            )
        pads = []
        for m, n in zip(grid, phys):
            if m < n or (m - n) % 2:
                raise GridError(
                    f"mode='refine': cannot place the physical grid {tuple(phys)} inside the "
                    f"layer's grid {grid} (expected symmetric domain padding)."
                )
            pads.append((m - n) // 2)
        probe = self._probe(module, v, tuple(pads))
        zero = torch.zeros_like(v[:1])
        out = output
        bias = None
        faces = []
        for axis, sides in ctx.faces.items():
            pos = [pads[axis] if s == "low" else pads[axis] + phys[axis] - 1 for s in sides]
            faces += [(axis, p) for p in pos]
            op = self._operator(probe, axis, tuple(pos))
            # T2 on the layer's ORIGINAL boundary inputs (an earlier axis's update at shared
            # corner nodes is not a boundary value)
            lin = out - (probe.bias if bias is None else bias)
            delta = self._delta(op, v, lin, axis, pos)
            if v.ndim == 3:
                # 1D: L(E_B delta) from the cached impulse responses at the faces (a small
                # matrix product instead of another evaluation of the layer)
                if bias is None:
                    bias = module.forward(zero)  # A(0), with grad
                resp = probe.face_responses(axis, tuple(pos))  # (S, C_in, C_out, M)
                out = out + torch.einsum("bcs,scom->bom", delta, resp)
            else:
                update = torch.zeros_like(v)
                for j, p in enumerate(pos):
                    update.select(2 + axis, p).copy_(delta[:, :, j])
                both = module.forward(torch.cat([update, zero]))  # L(update) and A(0), with grad
                bias = both[-1:]
                out = out + (both[:-1] - bias)
        # T1: the boundary rows pass the boundary inputs through (plus the bias)
        with torch.no_grad():
            gap = max(
                float(
                    (out.select(2 + a, p) - v.select(2 + a, p) - bias.select(2 + a, p)).abs().max()
                )
                for a, p in faces
            )
            self.t1_gap = gap / (float(v.abs().max()) + 1e-30)
        for axis, p in faces:
            out.select(2 + axis, p).copy_(v.select(2 + axis, p) + bias.select(2 + axis, p))
        return out

    def _operator(self, probe: _Probe, axis: int, pos: tuple[int, ...]) -> Tensor:
        """``(K^H K + lam^2 I)^{-1} K^H`` per tangential frequency: (*freq, S*C, S*C)."""
        key = (axis, pos)
        if key in probe.ops:
            return probe.ops[key]
        resp = probe.response  # (C_in, C_out, *grid)
        a = 2 + axis
        m = resp.shape[a]
        c = resp.shape[0]
        tan = [d for d in range(2, resp.ndim) if d != a]
        shifts = [-probe.origin[d - 2] for d in tan]
        rows = []
        for p_out in pos:
            row = []
            for p_in in pos:
                k = resp.select(a, (p_out - p_in + probe.origin[axis]) % m)
                if shifts:  # tangential offset tau = 0 at index 0
                    k = torch.roll(k, shifts=shifts, dims=list(range(2, k.ndim)))
                row.append(k)  # (C_in, C_out, *tan)
            rows.append(torch.stack(row, dim=0))
        kbb = torch.stack(rows, dim=0).to(torch.float64)  # (S_out, S_in, C_in, C_out, *tan)
        n_tan = len(tan)
        if n_tan:
            kbb = torch.fft.rfftn(kbb, dim=list(range(-n_tan, 0)))
        s = len(pos)
        k = kbb.permute(*range(4, kbb.ndim), 0, 3, 1, 2).reshape(*kbb.shape[4:], s * c, s * c)
        kh = k.mH
        gram = kh @ k
        smax2 = float(torch.linalg.matrix_norm(k.detach(), ord=2).amax()) ** 2
        eye = torch.eye(s * c, dtype=gram.dtype, device=gram.device)
        op = torch.linalg.solve(gram + (self.rcond**2 * smax2) * eye, kh)
        self._record(axis, gram, smax2)
        probe.ops[key] = op
        return op

    @staticmethod
    def _delta(op: Tensor, v: Tensor, lin: Tensor, axis: int, pos: Sequence[int]) -> Tensor:
        """The face update from the residual ``v_B - (L v)_B``: (batch, C, S, *tangential)."""
        a = 2 + axis
        r = torch.stack([v.select(a, p) - lin.select(a, p) for p in pos], dim=2)
        r = r.to(torch.float64)  # (batch, C, S, *tan)
        n_tan = r.ndim - 3
        fdims = list(range(-n_tan, 0))
        tan_sizes = list(r.shape[3:])
        if n_tan:
            r = torch.fft.rfftn(r, dim=fdims)
        b, c, s = r.shape[:3]
        vec = r.permute(0, *range(3, r.ndim), 2, 1).reshape(b, *r.shape[3:], s * c, 1)
        d = (op @ vec).squeeze(-1).reshape(b, *r.shape[3:], s, c)
        nd = d.ndim
        d = d.permute(0, nd - 1, nd - 2, *range(1, nd - 2))  # (batch, C, S, *freq)
        if n_tan:
            d = torch.fft.irfftn(d, s=tan_sizes, dim=fdims)
        return d.to(v.dtype)

    def _record(self, axis: int, gram: Tensor, smax2: float) -> None:
        if smax2 == 0.0:
            self.stats[axis] = 0.0
            return
        eig = torch.linalg.eigvalsh(gram).clamp_min(0)  # squared singular values, per frequency
        live = eig[..., -1] > 1e-10 * smax2  # frequencies where the layer responds at all
        if not bool(live.any()):
            self.stats[axis] = 0.0
            return
        self.stats[axis] = math.sqrt(float(eig[live][..., 0].min()) / smax2)
