"""The symbol of a shift-invariant layer on a grid, and the boundary blocks it implies (private).

A layer whose linear part is a circular convolution on its (padded) grid of shape ``M`` is fully
described by its symbol ``H(k)``, one ``C_in x C_out`` matrix per frequency ``k``:
``L(x) = IDFT(H . DFT(x))``. The kernel refinement needs two things from it (see ``refine``):

- the block ``K_BB`` from the boundary nodes of one axis to themselves. The faces of axis ``a``
  are coupled along the tangential axes by a convolution, so in the tangential Fourier basis
  ``K_BB`` is block diagonal: one ``(S C) x (S C)`` matrix per tangential frequency ``xi``
  (``S`` faces),
  ``K_BB(xi)[s', s] = 1/M_a sum_{k_a} H(k_a, xi) exp(2 pi i k_a (p_s' - p_s) / M_a)``;
- the layer's response ``L(E_B delta)`` to an update ``delta`` supported on the faces, whose DFT is
  ``H(k) sum_s delta_s(xi) exp(-2 pi i k_a p_s / M_a)``.

Both need ``H`` only where it is non-zero. A spectral convolution keeps a few modes per axis, so
its symbol lives on a small box of frequencies and everything above costs a few small products,
independent of the grid size, plus one inverse FFT for the response.

Where the symbol comes from:

- :func:`symbol_from_kernel`: closed form, from a :class:`SpectralKernel` (the weights at the
  retained modes of a layer ``y = irfftn(W . rfftn(x)) + bias``, e.g. neuraloperator's
  ``SpectralConv``), differentiably in the weights, without evaluating the layer;
- :func:`symbol_from_response`: from the layer's measured response to impulses (any
  shift-invariant layer; the generic path).

Conventions: ``Symbol.h`` is the half spectrum of ``torch.fft.rfftn`` (last axis ``0..M//2``) on
a box of frequencies given per axis as indices into the ``rfftn`` grid; along every axis but the
last the box is closed under negation (``k`` and ``-k mod M``), so the full spectrum follows from
Hermitian symmetry ``H(-k) = conj(H(k))`` (the layer maps real fields to real fields).
``torch.fft.irfftn`` reads only the real part of a spectrum on the planes ``k_last = 0`` and
``k_last = M_last / 2``; a layer ``irfftn(W . rfftn(x))`` therefore has the symbol ``W`` off those
planes and ``(W(k) + conj(W(-k))) / 2`` on them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import GridError

__all__ = ["SpectralKernel", "Symbol", "cbmm", "symbol_from_kernel", "symbol_from_response"]


@dataclass(frozen=True)
class SpectralKernel:
    """A layer ``y = irfftn(W . rfftn(x), s=grid) + bias`` described by its retained modes.

    ``(W . X)[b, o, k] = sum_i W[i, o, k] X[b, i, k]`` on the modes ``k`` of the product grid
    ``freqs[0] x ... x freqs[-1]``; every other frequency of the output is zero. The FFT
    normalisation does not matter as long as the forward and inverse transforms use the same one
    (their product is ``1 / prod(grid)`` for every ``norm``).

    Attributes
    ----------
    weight : Tensor
        shape: (C_in, C_out, *modes), complex. Differentiable in the layer's parameters.
    freqs : tuple of Tensor
        One int64 tensor per grid axis, shape (modes[d],): the indices of the retained modes in
        the ``rfftn`` grid (``0..M_d - 1`` along every axis but the last, ``0..M_last // 2`` along
        the last), without repeats.
    grid : tuple of int
        The grid ``M`` the layer runs on (its input's spatial shape).
    bias : Tensor or None
        ``A(0)``: shape broadcastable to (1, C_out, *grid), real; ``None`` for no bias.
    exact : bool
        ``True`` when the layer's forward computes this formula and nothing else (for
        neuraloperator's ``SpectralConv``: its own ``forward``, full precision): the refinement
        then evaluates the refined layer from the description in one pass (T2 applied to the
        spectrum, no update of the input in space). ``False``: the layer's own forward runs on
        the updated input.
    """

    weight: Tensor
    freqs: tuple[Tensor, ...]
    grid: tuple[int, ...]
    bias: Tensor | None = None
    exact: bool = False


@dataclass
class Symbol:
    """The symbol ``H`` of a real shift-invariant layer on a box of frequencies.

    Attributes
    ----------
    h : Tensor
        shape: (C_in, C_out, *box), complex; the half spectrum (``rfftn`` layout) on the box.
    idx : tuple of Tensor
        Per axis, int64 indices of the box in the ``rfftn`` grid; closed under negation modulo
        ``M_d`` along every axis but the last.
    grid : tuple of int
        The grid ``M``.
    """

    h: Tensor
    idx: tuple[Tensor, ...]
    grid: tuple[int, ...]

    # ------------------------------------------------------------------------------- helpers
    @functools.cached_property
    def box(self) -> tuple[tuple[int, ...], ...]:
        """``idx`` as Python integers: the key of the constants of this box (see ``_cached``)."""
        return tuple(tuple(int(k) for k in i.tolist()) for i in self.idx)

    def _negation(self, d: int) -> Tensor:
        """Positions in ``idx[d]`` of ``-idx[d] mod M_d`` (axis ``d`` not the last)."""
        return _negation(self.grid[d], self.box[d], self.idx[d].device)

    def _synthesise(self, t: Tensor, axis: int, q: Sequence[int]) -> Tensor:
        """``1/M_a sum_k t(k, xi) exp(2 pi i k q / M_a)`` over ALL frequencies ``k`` along
        ``axis`` (the inverse DFT along ``axis`` at the positions ``q``), for ``t`` of layout
        (a, b, *box), the half spectrum of something real. Returns (a, b, T, len(q)).

        Along the last axis the negative frequencies are not stored: their terms are
        ``conj(Q(-xi))`` with ``Q`` the same sum over the mirrored frequencies, computed on the
        stored ones (no copy of ``t``), in the same product (the two phase matrices side by
        side)."""
        last = axis == len(self.grid) - 1
        phase = _phase(self.grid[axis], self.box[axis], tuple(q), last, t.dtype, t.device)
        t = t.movedim(2 + axis, -1)
        t = t.flatten(2, -2) if t.ndim > 3 else t.unsqueeze(2)  # (a, b, T, K)
        out = _mm_last(t, phase)
        if not last:
            return out
        n = len(q)
        neg = _tangential_negation(self.grid, self.box, t.device)
        return out[..., :n] + out[..., n:].index_select(2, neg).conj()

    def _tangential_negation(self) -> Tensor:
        """Flat positions of ``-xi`` over the boxes of every axis but the last (the tangential
        frequencies of the last axis, in :meth:`tangential`'s layout)."""
        return _tangential_negation(self.grid, self.box, self.h.device)

    def box_matrix(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The real DFT matrix of the last axis on the box, the columns of ``cos`` and ``-sin``
        interleaved (the product is the spectrum as pairs of real numbers): (M_last, 2 K)."""
        n = len(self.grid)
        return _dft_last(self.grid[n - 1], self.box[n - 1], dtype, device)

    def box_finish(self, f: Tensor) -> Tensor:
        """``rfftn(v)`` on the box from ``v @ box_matrix`` (B, C, *grid[:-1], 2 K), by products
        with the box's DFT matrices along the other axes: (B, C, *box), complex."""
        n = len(self.grid)
        f = torch.view_as_complex(f.unflatten(-1, (-1, 2)))  # (B, C, *grid[:-1], K_last)
        for d in range(n - 1):
            e = _dft_complex(self.grid[d], self.box[d], f.real.dtype, f.device)
            f = _mm_last(f.movedim(2 + d, -1), e).movedim(-1, 2 + d)
        return f

    def box_fft(self, v: Tensor) -> Tensor:
        """``rfftn(v)`` on the box only, by FFTs: ``rfft`` along the last axis, the box's
        columns kept, then an FFT along each other axis on those columns only, the box's rows
        kept (cheaper than ``rfftn`` of the whole grid).

        ``v``: shape (B, C, *grid), real. Returns shape (B, C, *box), complex.
        """
        return self.box_fft_and_faces(v, (), ())[0]

    def box_fft_and_faces(
        self, v: Tensor, dims: tuple[int, ...], idx: tuple[Tensor, ...]
    ) -> tuple[Tensor, ...]:
        """:meth:`box_fft` of ``v`` and its faces ``v.index_select(dims[j], idx[j])``, in one
        autograd node: the backward writes the faces' gradients into the spectrum's (one
        gradient of ``v``'s size, where separate nodes would each add one)."""
        n = len(self.grid)
        return _BoxFFT.apply(v, self.grid, self.box, self.idx[: n - 1], self.idx[n - 1], dims, *idx)

    def box_ifft(self, y: Tensor) -> Tensor:
        """The real field whose spectrum is ``y`` on the box and 0 elsewhere (``irfftn`` of the
        spectrum filled with zeros), by FFTs on the box's columns only: an inverse FFT along each
        axis but the last (zeros off the box), then ``irfft`` along the last. The inverse of
        :meth:`box_fft` on fields whose spectrum lives on the box.

        ``y``: shape (B, C, *box), complex. Returns shape (B, C, *grid), real.
        """
        n = len(self.grid)
        for d in range(n - 1):
            shape = list(y.shape)
            shape[2 + d] = self.grid[d]
            full = torch.zeros(shape, dtype=y.dtype, device=y.device)
            y = torch.fft.ifft(full.index_copy(2 + d, self.idx[d], y), dim=2 + d)
        last, box = self.grid[n - 1], self.box[n - 1]
        if box != tuple(range(len(box))):  # irfft pads a prefix of the columns by itself
            shape = list(y.shape)
            shape[-1] = last // 2 + 1
            full = torch.zeros(shape, dtype=y.dtype, device=y.device)
            y = full.index_copy(y.ndim - 1, self.idx[n - 1], y)
        return torch.fft.irfft(y, n=last, dim=-1)

    def face_spectrum(self, d: Tensor, axis: int, pos: Sequence[int]) -> Tensor:
        """The spectrum on the box of the field that holds the face data ``d`` at the positions
        ``pos`` along ``axis`` and zero elsewhere: ``sum_s d_s(xi) exp(-2 pi i k p_s / M_a)``.

        ``d``: shape (B, C, S, T), complex, in :meth:`tangential`'s layout. Returns shape
        (B, C, *box), complex.
        """
        n = len(self.grid)
        b, c = d.shape[:2]
        phase = _phase(self.grid[axis], self.box[axis], tuple(pos), False, d.dtype, d.device)
        phase = phase.mT.conj() * self.grid[axis]  # (S, K_a): exp(-2 pi i k p / M_a)
        f = _mm_last(d.transpose(2, 3), phase)  # (B, C, T, K_a)
        tan = [len(self.box[j]) for j in range(n) if j != axis]
        return f.reshape(b, c, *tan, f.shape[-1]).movedim(-1, 2 + axis)

    def _dft(self, d: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """``cos`` and ``sin`` of ``2 pi n k / M_d``: (M_d, K_d) each, for the box's ``k``."""
        return _dft(self.grid[d], self.box[d], dtype, device)

    def face_values(self, y: Tensor, axis: int, pos: Sequence[int]) -> Tensor:
        """The tangential DFT (layout of :meth:`tangential`) of the real field whose spectrum
        is ``y`` on the box and 0 elsewhere, at the positions ``pos`` along ``axis``.

        ``y``: shape (B, C, *box), complex. Returns shape (B, C, S, T), complex.
        """
        return self._synthesise(y, axis, pos).transpose(2, 3)  # (B, C, S, T)

    def untangential(self, d: Tensor, axis: int) -> Tensor:
        """Inverse of :meth:`tangential` for face data supported on the box.

        ``d``: shape (B, C, S, T), complex. Returns shape (B, C, S, *tan), real.
        """
        n = len(self.grid)
        tan = [j for j in range(n) if j != axis]
        if not tan:
            return d[..., 0].real
        sizes = [self.grid[j] for j in tan]
        half = axis != n - 1  # rfftn layout over the tangential axes
        spec = [*sizes[:-1], sizes[-1] // 2 + 1] if half else sizes
        flat = _flat_index(tuple(spec), tuple(self.box[j] for j in tan), d.device)
        b, c, s = d.shape[:3]
        full = torch.zeros((b, c, s, math.prod(spec)), dtype=d.dtype, device=d.device)
        full = full.index_copy(3, flat, d).reshape(b, c, s, *spec)
        dims = list(range(3, 3 + len(tan)))
        if half:
            return torch.fft.irfftn(full, s=sizes, dim=dims)
        return torch.fft.ifftn(full, dim=dims).real

    def tangential(self, r: Tensor, axis: int) -> Tensor:
        """The tangential DFT of face data on the box: (B, C, S, *tan) -> (B, C, S, T) complex.

        ``rfftn`` over the tangential axes when the grid's last axis is among them (the box's
        layout), ``fftn`` otherwise.
        """
        n = len(self.grid)
        tan = [d for d in range(n) if d != axis]
        if not tan:
            return r.to(_complex(r.dtype)).unsqueeze(-1)
        dims = [3 + j for j in range(len(tan))]
        f = (torch.fft.rfftn if axis != n - 1 else torch.fft.fftn)(r, dim=dims)
        for j, d in enumerate(tan):
            f = f.index_select(3 + j, self.idx[d])
        return f.flatten(3)

    # ------------------------------------------------------------------------- the two uses
    def boundary_block(self, axis: int, pos: Sequence[int]) -> Tensor:
        """``K_BB`` of the faces at ``pos`` along ``axis``, per tangential frequency of the box.

        Returns
        -------
        Tensor
            shape: (T, S C_out, S C_in), complex; rows and columns ordered (face, channel); ``T``
            the number of tangential frequencies of the box (1 in 1D).
        """
        diff = [p - q for p in pos for q in pos]  # (S_out S_in,)
        kbb = self._synthesise(self.h, axis, diff)  # (C_in, C_out, T, S_out S_in)
        s, c_in, c_out, t = len(pos), kbb.shape[0], kbb.shape[1], kbb.shape[2]
        kbb = kbb.reshape(c_in, c_out, t, s, s).permute(2, 3, 1, 4, 0)  # (T, S_out, o, S_in, i)
        return kbb.reshape(t, s * c_out, s * c_in)

    def respond(self, x: Tensor) -> Tensor:
        """``H . x`` on the box: (B, C_in, *box) -> (B, C_out, *box).

        One real batched product per box frequency, ``[H_r; H_i] @ [x_r, x_i]``, combined as
        ``y_r = H_r x_r - H_i x_i`` and ``y_i = H_i x_r + H_r x_i`` (one autograd node,
        :class:`_Respond`); the weight side is built once per symbol and dtype (a prepared
        symbol serves many calls without gradients)."""
        b = x.shape[0]
        a = self._respond_matrix(x.dtype)  # (K, 2 C_out, C_in)
        y = _Respond.apply(a, x.flatten(2))  # (B, C_out, K)
        return y.reshape(b, a.shape[1] // 2, *x.shape[2:])

    def _respond_matrix(self, dtype: torch.dtype) -> Tensor:
        """``[H_r^T; H_i^T]`` per box frequency: (K, 2 C_out, C_in), real."""
        cache = self.__dict__.setdefault("_respond", {})
        a = cache.get(dtype)
        if a is None:
            h = torch.view_as_real(self.h.to(dtype).flatten(2))  # (C_in, C_out, K, 2)
            a = h.permute(2, 3, 1, 0).reshape(h.shape[2], 2 * h.shape[1], h.shape[0])
            cache[dtype] = a
        return a

    def dense(self) -> Tensor:
        """The symbol on the whole ``rfftn`` grid (zeros off the box): (C_in, C_out, *rgrid)."""
        c_in, c_out = self.h.shape[:2]
        return self._scatter(self.h.reshape(1, c_in * c_out, *self.h.shape[2:])).reshape(
            c_in, c_out, *self._rgrid()
        )

    def _rgrid(self) -> list[int]:
        return [*self.grid[:-1], self.grid[-1] // 2 + 1]

    def _scatter(self, y: Tensor) -> Tensor:
        """(B, C, *box) -> (B, C, *rgrid), zeros off the box."""
        rgrid = self._rgrid()
        flat = _flat_index(tuple(rgrid), self.box, y.device)
        b, c = y.shape[:2]
        full = torch.zeros((b, c, math.prod(rgrid)), dtype=y.dtype, device=y.device)
        full = full.index_copy(2, flat, y.reshape(b, c, -1))
        return full.reshape(b, c, *rgrid)


# ---------------------------------------------------------------- constants of a box, cached
# Functions of the grid, the box (Python integers), the dtype and the device only: never of the
# weights or the data. Built outside inference mode and without gradients, so that one entry
# serves every mode; never written to after construction (safe to share between threads).
_CACHE = 256


class _constants:
    def __enter__(self) -> None:
        self._modes = (torch.inference_mode(False), torch.no_grad())
        for m in self._modes:
            m.__enter__()

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)


@functools.lru_cache(maxsize=_CACHE)
def _dft(m: int, ks: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """``cos`` and ``sin`` of ``2 pi n k / m``: (m, K) each."""
    with _constants():
        nk = torch.outer(
            torch.arange(m, device=device, dtype=torch.float64),
            torch.tensor(ks, device=device, dtype=torch.float64),
        )
        ang = (2 * math.pi / m) * torch.remainder(nk, m)
        return torch.cos(ang).to(dtype), torch.sin(ang).to(dtype)


@functools.lru_cache(maxsize=_CACHE)
def _dft_last(m: int, ks: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``cos`` and ``-sin`` interleaved by column: (m, 2 K), real."""
    cos, sin = _dft(m, ks, dtype, device)
    with _constants():
        return torch.stack([cos, -sin], -1).flatten(-2)


@functools.lru_cache(maxsize=_CACHE)
def _dft_complex(m: int, ks: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``cos - i sin``: (m, K), complex."""
    cos, sin = _dft(m, ks, dtype, device)
    with _constants():
        return torch.complex(cos, -sin)


@functools.lru_cache(maxsize=_CACHE)
def _phase(
    m: int,
    ks: tuple[int, ...],
    qs: tuple[int, ...],
    mirror: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """``exp(2 pi i k q / m) / m``: (K, Q); with ``mirror``, (K, 2 Q): the same beside it with
    the rows of ``k = 0`` and ``2 k = m`` zero (the frequencies that have no mirror)."""
    with _constants():
        k = torch.tensor(ks, device=device)
        q = torch.tensor(qs, device=device)
        ang = (2 * math.pi / m) * k.to(torch.float64)[:, None] * q.to(torch.float64)[None, :]
        phase = (torch.exp(1j * ang) / m).to(dtype)
        if not mirror:
            return phase
        mask = (k > 0) & (2 * k != m)
        return torch.cat([phase, phase * mask[:, None].to(phase.dtype)], 1)


@functools.lru_cache(maxsize=_CACHE)
def _negation(m: int, ks: tuple[int, ...], device: torch.device) -> Tensor:
    """Positions in ``ks`` of ``-ks mod m``."""
    where = {k: j for j, k in enumerate(ks)}
    neg = [where.get((-k) % m) for k in ks]
    if None in neg:  # guarded by the constructors
        raise GridError("Symbol: the frequency box is not closed under negation.")
    with _constants():
        return torch.tensor(neg, dtype=torch.long, device=device)


@functools.lru_cache(maxsize=_CACHE)
def _tangential_negation(
    grid: tuple[int, ...], box: tuple[tuple[int, ...], ...], device: torch.device
) -> Tensor:
    """Flat positions of ``-xi`` over the boxes of every axis but the last."""
    with _constants():
        flat = torch.zeros((), dtype=torch.long, device=device)
        for d in range(len(grid) - 1):
            flat = flat.unsqueeze(-1) * len(box[d]) + _negation(grid[d], box[d], device)
        return flat.reshape(-1)


@functools.lru_cache(maxsize=_CACHE)
def _flat_index(
    sizes: tuple[int, ...], box: tuple[tuple[int, ...], ...], device: torch.device
) -> Tensor:
    """Flat positions of the box ``box[0] x box[1] x ...`` in a grid of shape ``sizes``."""
    with _constants():
        flat = torch.zeros((), dtype=torch.long, device=device)
        for size, i in zip(sizes, box):
            flat = flat.unsqueeze(-1) * size + torch.tensor(i, dtype=torch.long, device=device)
        return flat.reshape(-1)


class _Respond(torch.autograd.Function):
    """``y = H x`` per frequency from ``a = [H_r; H_i]`` (K, 2 C_out, C_in), real, and ``x``
    (B, C_in, K), complex: one ``bmm`` forward and one per input backward (the combination of
    the four real products and its adjoint written out, no slice nodes)."""

    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor) -> Tensor:
        k, c2, c_in = a.shape
        b = x.shape[0]
        c_out = c2 // 2
        xs = torch.view_as_real(x).permute(2, 1, 3, 0).reshape(k, c_in, 2 * b)  # [x_r | x_i]
        y = torch.bmm(a, xs).view(k, 2, c_out, 2, b)  # [[Hr xr, Hr xi], [Hi xr, Hi xi]]
        yr = y[:, 0, :, 0] - y[:, 1, :, 1]
        yi = y[:, 1, :, 0] + y[:, 0, :, 1]
        ctx.save_for_backward(a, x)  # the input, not xs: double backward sees x
        return torch.complex(yr, yi).permute(2, 1, 0)  # (B, C_out, K)

    @staticmethod
    def backward(ctx, g: Tensor):
        a, x = ctx.saved_tensors
        k, c2, c_in = a.shape
        xs = torch.view_as_real(x).permute(2, 1, 3, 0).reshape(k, c_in, 2 * x.shape[0])
        gk = g.permute(2, 1, 0)  # (K, C_out, B)
        gr, gi = gk.real, gk.imag
        dy = torch.stack([torch.stack([gr, gi], 2), torch.stack([gi, -gr], 2)], 1)
        dy = dy.reshape(k, c2, xs.shape[-1])
        da = dx = None
        if ctx.needs_input_grad[0]:
            da = torch.bmm(dy, xs.mT)
        if ctx.needs_input_grad[1]:
            b = xs.shape[-1] // 2
            dxs = torch.bmm(a.mT, dy).view(k, c_in, 2, b).permute(3, 1, 0, 2).contiguous()
            dx = torch.view_as_complex(dxs)  # (B, C_in, K)
        return da, dx


class _BoxFFT(torch.autograd.Function):
    """``Symbol.box_fft(v)`` and faces of ``v`` (see :meth:`Symbol.box_fft_and_faces`).

    Backward: the adjoint of each step in reverse (rows put back with zeros and an unscaled
    inverse FFT along each axis but the last; along the last, the adjoint of ``rfft``: an
    unscaled ``irfft`` of the gradient with the columns that ``irfft`` counts twice halved),
    then the faces' gradients added in place.
    """

    @staticmethod
    def forward(ctx, v, grid, box, idx_other, idx_last, dims, *faces_idx):
        n = len(grid)
        ctx.grid, ctx.box, ctx.dims = grid, box, dims
        ctx.save_for_backward(idx_last, *idx_other, *faces_idx)
        f = _keep(torch.fft.rfft(v, dim=-1), v.ndim - 1, box[n - 1], idx_last)
        for d in range(n - 1):
            f = torch.fft.fft(f, dim=2 + d).index_select(2 + d, idx_other[d])
        return (f, *(v.index_select(a, i) for a, i in zip(dims, faces_idx)))

    @staticmethod
    def backward(ctx, df, *dfaces):
        grid, box, dims = ctx.grid, ctx.box, ctx.dims
        n = len(grid)
        idx_last, *rest = ctx.saved_tensors
        idx_other, faces_idx = rest[: n - 1], rest[n - 1 :]
        if not ctx.needs_input_grad[0]:
            return (None,) * (6 + len(faces_idx))
        g = df
        for d in reversed(range(n - 1)):
            shape = list(g.shape)
            shape[2 + d] = grid[d]
            full = torch.zeros(shape, dtype=g.dtype, device=g.device)
            g = torch.fft.ifft(full.index_copy(2 + d, idx_other[d], g), dim=2 + d, norm="forward")
        m = grid[n - 1]
        twice = _rfft_twice(m, box[n - 1], g.real.dtype, g.device)  # 0.5 where irfft doubles
        g = g * twice
        if box[n - 1] != tuple(range(len(box[n - 1]))):
            shape = list(g.shape)
            shape[-1] = m // 2 + 1
            full = torch.zeros(shape, dtype=g.dtype, device=g.device)
            g = full.index_copy(g.ndim - 1, idx_last, g)
        dv = torch.fft.irfft(g, n=m, dim=-1, norm="forward")
        for a, i, gf in zip(dims, faces_idx, dfaces):
            if gf is not None:
                dv.index_add_(a, i, gf)
        return (dv, *(None,) * (5 + len(faces_idx)))


@functools.lru_cache(maxsize=_CACHE)
def _rfft_twice(m: int, ks: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Per kept column ``k`` of an ``rfft`` of length ``m``: 0.5 where ``irfft`` counts the
    column twice (``0 < k < m / 2``), else 1."""
    with _constants():
        k = torch.tensor(ks, dtype=torch.float64, device=device)
        return torch.where((k > 0) & (2 * k < m), 0.5, 1.0).to(dtype)


def _keep(f: Tensor, dim: int, box: tuple[int, ...], idx: Tensor) -> Tensor:
    """``f.index_select(dim, idx)``, as a view when the box is a prefix ``0..K-1``."""
    if box == tuple(range(len(box))):
        return f.narrow(dim, 0, len(box))
    return f.index_select(dim, idx)


def _mm_last(x: Tensor, mat: Tensor) -> Tensor:
    """``x @ mat`` over the last axis as ONE matrix product (forward and backward): (..., M) @
    (M, K) -> (..., K). ``matmul`` on a non-contiguous ``x`` falls back to a batched product
    that PyTorch's CPU backend runs matrix by matrix for complex tensors."""
    lead = x.shape[:-1]
    return (x.reshape(-1, x.shape[-1]) @ mat).reshape(*lead, mat.shape[-1])


def cbmm(a: Tensor, b: Tensor) -> Tensor:
    """Batched complex product ``a @ b`` as one real product: (K, m, n) @ (K, n, p).

    ``[[a_r, -a_i], [a_i, a_r]] @ [b_r; b_i] = [y_r; y_i]``, with contiguous operands forward and
    backward: PyTorch's CPU ``bmm`` runs matrix by matrix (a copy each) on complex or strided
    operands, which cost more than the whole layer here.
    """
    if a.shape[0] <= 32:  # few matrices: the per-matrix loop is cheaper than the copies below
        return a @ b
    ar, ai, br, bi = a.real, a.imag, b.real, b.imag
    big = torch.cat([torch.cat([ar, -ai], -1), torch.cat([ai, ar], -1)], -2)  # (K, 2m, 2n)
    y = torch.bmm(big, torch.cat([br, bi], -2))  # (K, 2m, p)
    m = a.shape[-2]
    return torch.complex(y[:, :m], y[:, m:])


def _complex(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _closed_under_negation(i: Tensor, m: int) -> Tensor:
    return torch.unique(torch.cat([i % m, (-i) % m]))


def symbol_from_kernel(kernel: SpectralKernel) -> Symbol:
    """The symbol of ``irfftn(W . rfftn(x))`` in closed form (differentiable in ``W``).

    Off the planes ``k_last in {0, M_last / 2}`` the symbol is ``W``; on them ``irfftn`` keeps
    only the Hermitian part, ``(W(k) + conj(W(-k))) / 2``, which is why the box is closed under
    negation along every axis but the last.
    """
    w, grid = kernel.weight, tuple(kernel.grid)
    n = len(grid)
    if w.ndim != 2 + n or len(kernel.freqs) != n:
        raise GridError(
            f"SpectralKernel: a weight of shape {tuple(w.shape)} with {len(kernel.freqs)} "
            f"frequency lists does not describe a layer on the {n}-d grid {grid}; expected "
            "(C_in, C_out, *modes) and one list per axis."
        )
    idx = []
    h = w
    for d in range(n):
        f = kernel.freqs[d].to(device=w.device, dtype=torch.long)
        if f.shape[0] != w.shape[2 + d]:
            raise GridError(
                f"SpectralKernel: axis {d} has {f.shape[0]} frequencies for "
                f"{w.shape[2 + d]} weight modes."
            )
        if d == n - 1:
            idx.append(f)
            continue
        u = _closed_under_negation(f, grid[d])
        where = (f[:, None] % grid[d] == u[None, :]).nonzero()[:, 1]
        shape = list(h.shape)
        shape[2 + d] = u.shape[0]
        h = torch.zeros(shape, dtype=h.dtype, device=h.device).index_copy(2 + d, where, h)
        idx.append(u)
    sym = Symbol(h, tuple(idx), grid)
    last = idx[-1]
    planes = ((last == 0) | (2 * last == grid[-1])).nonzero().flatten()
    if planes.numel():  # only these planes: irfftn keeps the Hermitian part there
        hp = h.index_select(h.ndim - 1, planes)
        hn = hp.conj()
        for d in range(n - 1):
            hn = hn.index_select(2 + d, sym._negation(d))
        sym.h = h.index_copy(h.ndim - 1, planes, 0.5 * (hp + hn))
    return sym


def symbol_from_response(response: Tensor, origin: Sequence[int], floor: float) -> Symbol:
    """The symbol of a layer from its impulse responses (the generic path).

    Parameters
    ----------
    response : Tensor
        shape: (C_in, C_out, *grid), real: ``L(e_i at origin)`` for every input channel ``i``.
    origin : sequence of int
        Where the impulses sat.
    floor : float
        Frequencies where ``|H|`` stays below ``floor`` (relative to its maximum) along a whole
        hyperplane are left out of the box (the layer does not respond there).
    """
    grid = tuple(response.shape[2:])
    n = len(grid)
    dims = list(range(2, 2 + n))
    h = torch.fft.rfftn(torch.roll(response, [-int(o) for o in origin], dims), dim=dims)
    mag = h.detach().abs()
    cut = floor * float(mag.max())
    idx = []
    for d in dims:
        others = [e for e in range(mag.ndim) if e != d]
        keep = torch.nonzero(mag.amax(dim=others) > cut).flatten()
        if d - 2 != n - 1:
            keep = _closed_under_negation(keep, grid[d - 2])
        if keep.numel() == 0:
            keep = torch.zeros(1, dtype=torch.long, device=h.device)
        idx.append(keep)
        h = h.index_select(d, keep)
        mag = mag.index_select(d, keep)
    return Symbol(h, tuple(idx), grid)
