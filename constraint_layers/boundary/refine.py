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
  ``L`` the refinement needs. While gradients are recorded the probe is part of the autograd graph
  (computed at every call): gradients are exact, including how ``K_BB^+`` depends on the weights,
  which dominates (``K_BB`` is ill-conditioned: freezing it changed a directional derivative from
  4.00 to -0.023 in the boundary-paper study, and trained worse). Without gradients it is cached
  until the weights change (their version counters): inference pays nothing for it. ``refresh=k``
  (k > 1) reuses a probe, frozen, for k weight changes: cheaper training steps, approximate
  gradients.
- The faces of one axis are coupled along the tangential axes by a convolution, so ``K_BB`` is
  block diagonal in the tangential Fourier basis: one ``(S C) x (S C)`` system per tangential
  frequency (``S`` = number of constrained sides), factorised in float64.
- ``L(E_B delta)`` comes from the probe too: in Fourier space the layer's response to the
  face-supported update is a ``C x C`` product per frequency it responds to (a spectral
  convolution keeps a few modes per axis), then one inverse FFT. No second evaluation of the layer
  on the data; ``A(0)`` (with gradients) is an evaluation on a batch of one.

Ill-conditioned ``K_BB`` (the rule, not the exception: a smooth kernel sees the two end nodes of a
periodic grid almost alike; measured smallest relative singular values 1e-5 to 1e-11 at paper
sizes): ``K_BB^+ = (K^H K + lam^2 I)^{-1} K^H`` with ``lam = rcond`` times the largest singular
value over all frequencies. Directions far above ``lam`` are inverted to rounding, those near or
below it are damped instead of blowing up; ``T1`` keeps the boundary rows exact either way. The
smallest relative
singular value seen is kept in :attr:`Refinement.stats`.

Several constrained axes (a 2D cavity): ``T2`` solves each axis's faces from the same residual (a
block-Jacobi step: a joint solve over the whole frame of faces is a dense system too large to
factorise at every step); ``T1`` writes the boundary rows of every face, so the decoupling of the
boundary rows is exact for every axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..errors import GridError

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
        self.response = (
            out[:c] - out[c:]
        )  # L(e_ci at origin) = A(e_ci) - A(0): (C_in, C_out, *grid)
        self.origin = origin
        self.ops: dict[tuple, Tensor] = {}  # per (axis, face positions): the K_BB solve operator
        self._box: dict | None = None

    def _spectrum(self) -> dict:
        """The impulse response in Fourier space, kept on the box of frequencies where the layer
        responds at all (a spectral convolution keeps a few modes per axis)."""
        if self._box is None:
            grid = list(self.response.shape[2:])
            n = len(grid)
            dims = list(range(2, 2 + n))
            spec = torch.fft.rfftn(self.response, dim=dims)  # (C_in, C_out, *freq)
            rgrid = [*grid[:-1], grid[-1] // 2 + 1]
            mag = spec.detach().abs()
            # above the rounding of the probe (FFTs of a float32 layer: about 1e-5 relative)
            floor = max(1e-6, 1e3 * torch.finfo(self.response.dtype).eps) * float(mag.max())
            idx = []
            for d in dims:
                others = [e for e in range(mag.ndim) if e != d]
                keep = torch.nonzero(mag.amax(dim=others) > floor).flatten()
                idx.append(keep)
                spec = spec.index_select(d, keep)
            c_in, c_out = spec.shape[:2]
            # (K, 2 C_in, 2 C_out): the complex product per frequency as one real batched
            # product, [x_re, x_im] @ [[k_re, k_im], [-k_im, k_re]] = [y_re, y_im]
            kc = spec.permute(*dims, 0, 1).reshape(-1, c_in, c_out)
            kmat = torch.cat(
                [torch.cat([kc.real, kc.imag], -1), torch.cat([-kc.imag, kc.real], -1)], -2
            ).contiguous()
            flat = torch.zeros((), dtype=torch.long, device=spec.device)
            for d, i in enumerate(idx):  # flat positions of the box in the rfftn grid
                flat = flat.unsqueeze(-1) * rgrid[d] + i
            real = spec.real.dtype
            omega = [2 * math.pi * i.to(real) / g for i, g in zip(idx, grid)]
            self._box = {
                "idx": idx,
                "kmat": kmat,
                "flat": flat.reshape(-1),
                "omega": omega,
                "rgrid": rgrid,
                "box": [len(i) for i in idx],
            }
        return self._box

    def correction(self, delta: Tensor, axis: int, pos: Sequence[int]) -> Tensor:
        """The spectrum of ``L(E_B delta)`` on the box, (batch, C_out, K): the layer's response
        to the face update ``delta`` (batch, C, S, *tangential) placed at positions ``pos`` along
        ``axis``. A ``C x C`` product per frequency where the layer responds, instead of another
        evaluation of the layer; :meth:`to_grid` turns (sums of) them into a field.
        """
        box = self._spectrum()
        idx, kmat, omega = box["idx"], box["kmat"], box["omega"]
        grid = list(self.response.shape[2:])
        n = len(grid)
        tan = [d for d in range(n) if d != axis]
        # DFT of the update over the tangential axes, in the layout of rfftn over the full grid,
        # kept on the box
        real = kmat.dtype
        dd = delta.to(real)
        if tan:
            tdims = [3 + j for j in range(len(tan))]
            dd = (torch.fft.rfftn if n - 1 in tan else torch.fft.fftn)(dd, dim=tdims)
            for j, d in enumerate(tan):
                dd = dd.index_select(3 + j, idx[d])
                # the probe's impulse sat at the origin, not at 0, along tangential axes
                sh = [1] * (dd.ndim - 3 - j - 1)
                dd = dd * torch.exp(1j * self.origin[d] * omega[d]).reshape(-1, *sh)
        else:
            dd = torch.complex(dd, torch.zeros_like(dd))
        # phases of the face positions along the axis: (S, box_axis)
        shifts = torch.tensor([p - self.origin[axis] for p in pos], dtype=real)
        phase = torch.exp(-1j * shifts.to(kmat.device)[:, None] * omega[axis][None, :])
        x = torch.einsum("bcs...,sk->bck...", dd, phase)  # (B, C, box_axis, *box_tan)
        x = x.movedim(2, 2 + axis)  # (B, C, *box)
        b, c = x.shape[:2]
        x = x.reshape(b, c, -1).permute(2, 0, 1)  # (K, B, C_in)
        y = torch.bmm(torch.cat([x.real, x.imag], -1), kmat)  # (K, B, 2 C_out)
        c_out = kmat.shape[-1] // 2
        y = torch.complex(y[..., :c_out], y[..., c_out:]).permute(1, 2, 0)  # (B, C_out, K)
        return y

    def to_grid(self, y: Tensor, dtype: torch.dtype) -> Tensor:
        """The real field whose spectrum on the box is ``y`` (batch, C_out, K)."""
        box = self._spectrum()
        grid = list(self.response.shape[2:])
        b, c_out = y.shape[:2]
        full = torch.zeros((b, c_out, math.prod(box["rgrid"])), dtype=y.dtype, device=y.device)
        full = full.index_copy(2, box["flat"], y).reshape(b, c_out, *box["rgrid"])
        return torch.fft.irfftn(full, s=grid, dim=list(range(2, 2 + len(grid)))).to(dtype)


class Refinement:
    """Forward hook that refines one shift-invariant affine layer (see the module docstring).

    Parameters
    ----------
    context : RefinementContext
        Shared with the wrapper, which switches it on around its own calls only: the model called
        on its own is not refined.
    rcond : float
        Relative Tikhonov parameter of the ``K_BB`` solve.
    refresh : int
        1 (default): exact gradients, the probe is recomputed inside the autograd graph at every
        call that records gradients. k > 1: the probe is reused, frozen (a constant for
        autograd), until the weights have changed k times: cheaper training steps with
        approximate gradients; T1 keeps the boundary rows exact either way.
    """

    def __init__(self, context: RefinementContext, rcond: float = 1e-2, refresh: int = 1) -> None:
        self.context = context
        self.rcond = rcond
        self.refresh = refresh
        self._cache: dict | None = None
        # diagnostics, kept as detached tensors and evaluated only when read (no eigenvalue
        # solve or host synchronisation on the training path)
        self._grams: dict[int, tuple[Tensor, Tensor]] = {}
        self._gap: tuple[Tensor, Tensor] | None = None

    @property
    def stats(self) -> dict[int, float]:
        """Smallest singular value of K_BB relative to the largest, per axis, from the last
        probe (frequencies where the layer does not respond at all left out)."""
        out = {}
        for axis, (gram, smax2_t) in self._grams.items():
            smax2 = float(smax2_t)
            eig = torch.linalg.eigvalsh(gram).clamp_min(0) if smax2 > 0 else None
            live = None if eig is None else eig[..., -1] > 1e-10 * smax2
            if live is None or not bool(live.any()):
                out[axis] = 0.0
            else:
                out[axis] = math.sqrt(float(eig[live][..., 0].min()) / smax2)
        return out

    @property
    def t1_gap(self) -> float:
        """How far the T2 update left the boundary rows from the boundary inputs before T1
        wrote them in the last call, relative to max |v| (rounding when K_BB is well conditioned
        and rcond small); NaN before the first call."""
        if self._gap is None:
            return float("nan")
        gap, vmax = self._gap
        return float(gap) / (float(vmax) + 1e-30)

    # -------------------------------------------------------------------------------- probe
    def _probe(self, module: torch.nn.Module, v: Tensor, origin: tuple[int, ...]) -> _Probe:
        params = list(module.parameters())
        recording = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        if recording and self.refresh == 1:
            # training: the probe in the autograd graph, so that gradients follow how K_BB^+
            # and the impulse response depend on the weights (exact gradients)
            self._cache = None
            return _Probe(module.forward, v, origin)
        key = (tuple(v.shape[1:]), v.dtype, v.device, origin, tuple(id(p) for p in params))
        versions = tuple(p._version for p in params)
        cache = self._cache
        if cache is not None and cache["key"] == key:
            if versions != cache["versions"]:  # the weights changed (an optimizer step)
                cache["versions"] = versions
                cache["changes"] += 1
            if cache["changes"] < self.refresh:
                return cache["probe"]
        with torch.no_grad():
            probe = _Probe(module.forward, v, origin)
        self._cache = {"key": key, "versions": versions, "changes": 0, "probe": probe}
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
        bias = module.forward(torch.zeros_like(v[:1]))  # A(0), with grad: a batch of one
        lin = output - bias
        faces = []
        spectrum = 0
        for axis, sides in ctx.faces.items():
            pos = [pads[axis] if s == "low" else pads[axis] + phys[axis] - 1 for s in sides]
            faces += [(axis, p) for p in pos]
            op = self._operator(probe, axis, tuple(pos))
            # T2 per axis from the same residual (several axes: a block-Jacobi step, the same
            # whatever the order of the conditions); all updates leave in one inverse FFT
            delta = self._delta(op, v, lin, axis, pos)
            spectrum = spectrum + probe.correction(delta, axis, pos)  # L(E_B delta)
        out = output + probe.to_grid(spectrum, output.dtype)
        # T1: the boundary rows pass the boundary inputs through (plus the bias)
        with torch.no_grad():
            gap = torch.stack(
                [
                    (out.select(2 + a, p) - v.select(2 + a, p) - bias.select(2 + a, p)).abs().amax()
                    for a, p in faces
                ]
            ).amax()
            self._gap = (gap, v.abs().amax())
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
        s = len(pos)
        # every slab K(p_out <- p_in) in one gather (one scatter in the backward pass)
        offsets = [(p_out - p_in + probe.origin[axis]) % m for p_out in pos for p_in in pos]
        slabs = resp.index_select(a, torch.tensor(offsets, device=resp.device))
        slabs = slabs.movedim(a, 0).reshape(s, s, c, resp.shape[1], *[resp.shape[d] for d in tan])
        if shifts:  # tangential offset tau = 0 at index 0
            slabs = torch.roll(slabs, shifts=shifts, dims=list(range(4, slabs.ndim)))
        kbb = slabs.to(torch.float64)  # (S_out, S_in, C_in, C_out, *tan)
        n_tan = len(tan)
        if n_tan:
            kbb = torch.fft.rfftn(kbb, dim=list(range(-n_tan, 0)))
        k = kbb.permute(*range(4, kbb.ndim), 0, 3, 1, 2).reshape(*kbb.shape[4:], s * c, s * c)
        kh = k.mH
        gram = kh @ k
        # lam = rcond * the largest singular value over all frequencies; it follows the weights
        # (a constant lam would leave a term out of the gradient)
        smax2_t = torch.linalg.matrix_norm(k, ord=2).amax().square()
        eye = torch.eye(s * c, dtype=gram.dtype, device=gram.device)
        op = torch.linalg.solve(gram + (self.rcond**2 * smax2_t) * eye, kh)
        self._grams[axis] = (gram.detach(), smax2_t.detach())
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
        freq = r.shape[3:]
        vec = r.permute(*range(3, r.ndim), 2, 1, 0).reshape(-1, s * c, b)  # (F, S*C, B)
        d = (op.reshape(-1, s * c, s * c) @ vec).reshape(*freq, s, c, b)
        nd = d.ndim
        d = d.permute(nd - 1, nd - 2, nd - 3, *range(nd - 3))  # (batch, C, S, *freq)
        if n_tan:
            d = torch.fft.irfftn(d, s=tan_sizes, dim=fdims)
        return d.to(v.dtype)
