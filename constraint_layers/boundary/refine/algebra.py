"""The refinement's spectral algebra: from a layer's symbol to T2 (private).

Given the symbol ``H`` of a layer on its box of frequencies
(:class:`~constraint_layers.boundary.spectral.Symbol`) and the faces ``B`` of every eliminated
axis:

- :func:`probe_symbol`: the symbol of a layer without a description, from one batched evaluation
  on ``C`` impulses and a zero input;
- :func:`regularised_inverse`: ``K_BB^+ = (K^H K + lam^2 I)^{-1} K^H`` per tangential frequency
  (``K`` the ``(S C) x (S C)`` block of ``K_BB`` there, complex128), ``lam`` = ``rcond`` times the
  largest Frobenius norm of the blocks (at least their largest singular value; differentiable
  without an SVD); ``rcond = 0``: the pseudo-inverse. Directions far above ``lam`` are inverted to
  rounding, those near or below it damped;
- :func:`face_delta`: T2's update of one axis's faces, ``delta = K_BB^+ (t_B - (L v)_B)``, in the
  tangential Fourier layout, from the box spectrum of ``L v``;
- :func:`update_input`: ``v' = v + E_B delta`` on the layer's input, every axis from the same
  residual (block Jacobi over axes): the two-hook path;
- :func:`refined_layer`: the layer ``irfftn(H . rfftn(v))`` with T2 applied to its spectrum, ``H
  (X + sum_axes Delta_axis)``, ``Delta_axis`` the box spectrum of the face update (a few small
  products, no field of the grid's size) and one inverse transform: the one-pass path.

Everything is computed from the symbol, never by evaluating the layer again; the solves run in
complex128 whatever the layer's dtype.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ...errors import GridError
from ..spectral import Symbol, cbmm, symbol_from_response
from .autograd import _RegularisedSolve, _Sample

__all__ = [
    "face_delta",
    "probe_symbol",
    "refined_layer",
    "regularised_inverse",
    "solve",
    "update_input",
]

#: A factorised ``K_BB^+`` of one axis (see :func:`regularised_inverse`).
Operator = tuple[Tensor, ...]
#: Per eliminated axis, the positions of its faces on the layer's grid.
Faces = tuple[tuple[int, tuple[int, ...]], ...]


@functools.lru_cache(maxsize=256)
def _index(pos: tuple[int, ...], device: torch.device) -> Tensor:
    """The positions as an index tensor (a constant, shared: never written to)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(pos, dtype=torch.long, device=device)


def probe_symbol(module: torch.nn.Module, v: Tensor, origin: tuple[int, ...]) -> Symbol:
    """The symbol from one batched evaluation on ``C`` impulses at ``origin`` and zero.

    ``v`` (B, C, *grid): the layer's input (its channels, grid, dtype and device).
    """
    c = v.shape[1]
    grid = tuple(v.shape[2:])
    batch = torch.zeros((c + 1, c, *grid), dtype=v.dtype, device=v.device)
    idx = torch.arange(c, device=v.device)
    batch[(idx, idx, *origin)] = 1.0
    out = module.forward(batch)  # shape: (C + 1, C_out, *grid)
    if tuple(out.shape[2:]) != grid:
        raise GridError(
            "mode='refine': a refined layer must keep its grid (got input grid "
            f"{grid}, output grid {tuple(out.shape[2:])}); layers that resample "
            "(resolution_scaling_factor, output_shape, UNO scalings) are not supported."
        )
    if out.shape[1] != c:
        raise GridError(
            "mode='refine': a refined layer must map C channels to C channels (its boundary "
            f"outputs become its boundary inputs), got {c} -> {out.shape[1]}."
        )
    response = out[:c] - out[c:]  # L(e_ci at origin): (C_in, C_out, *grid)
    # above the rounding of the probe (FFTs of a float32 layer: about 1e-5 relative)
    floor = max(1e-6, 1e3 * torch.finfo(v.dtype).eps)
    return symbol_from_response(response, origin, floor)


def regularised_inverse(
    sym: Symbol, axis: int, pos: tuple[int, ...], rcond: float
) -> tuple[Operator, Tensor]:
    """``K_BB^+`` per tangential frequency, factorised, and the Gram matrices ``K^H K``.

    Returns ``(op, gram)``: ``op`` is ``(L, K, lam^2, K^H)`` with ``L`` the Cholesky factor of
    ``K^H K + lam^2 I`` ((T, S C, S C), complex128; a constant for autograd, see
    :class:`~constraint_layers.boundary.refine.autograd._RegularisedSolve`); or, when ``K`` is a
    constant (built without gradients: inference, a frozen or detached block) or for rcond 0,
    ``(K_BB^+,)`` as one matrix per frequency (one product per call). ``gram`` (T, S C, S C) is
    detached (the diagnostics' ``stats``).
    """
    k = sym.boundary_block(axis, pos).to(torch.complex128)
    if rcond == 0:
        with torch.no_grad():
            gram = cbmm(k.mH.contiguous(), k)
        return (torch.linalg.pinv(k),), gram
    # lam = rcond * the largest Frobenius norm over the frequencies: it follows the weights
    # (a constant lam would leave a term out of the gradient) and costs no SVD; the largest
    # block is found without gradients, its norm taken with them (the gradient of amax)
    with torch.no_grad():
        top = torch.view_as_real(k).square().sum(dim=(-3, -2, -1)).argmax()
    lam2 = rcond**2 * torch.view_as_real(k[top]).square().sum()
    with torch.no_grad():
        kh = k.mH.contiguous()  # K^H for the forward product (a constant, like chol)
        gram = cbmm(kh, k)
        eye = torch.eye(k.shape[-1], dtype=gram.dtype, device=gram.device)
        chol = torch.linalg.cholesky(gram + lam2 * eye)
        if not k.requires_grad:  # a constant operator: the regularised inverse, explicitly
            return (torch.cholesky_solve(kh, chol),), gram
    return (chol, k, lam2, kh), gram


def solve(op: Operator, rhs: Tensor) -> Tensor:
    """``K_BB^+ rhs`` per frequency: (T, S C, B) -> (T, S C, B)."""
    if len(op) == 1:
        return cbmm(op[0], rhs)
    chol, k, lam2, kh = op
    return _RegularisedSolve.apply(k, lam2, rhs, chol, kh)


def face_delta(
    sym: Symbol, op: Operator, y: Tensor, vb: Tensor, axis: int, pos: tuple[int, ...]
) -> Tensor:
    """T2's update of the faces at ``pos`` along ``axis``, ``K_BB^+ (v_B - (L v)_B)``, in the
    tangential Fourier layout: ``y`` the spectrum of ``L v`` on the box (complex128), ``vb`` the
    layer input's faces (``v.index_select(2 + axis, pos)``), ``op`` the axis's ``K_BB^+``.
    Returns (B, C, S, T), complex128."""
    vb = vb.movedim(2 + axis, 2).to(torch.float64)  # (B, C, S, *tan)
    r = sym.tangential(vb, axis) - sym.face_values(y, axis, pos)  # (B, C, S, T)
    b, c, s, t = r.shape
    vec = r.permute(3, 2, 1, 0).reshape(t, s * c, b)
    return solve(op, vec).reshape(t, s, c, b).permute(3, 2, 1, 0)


def update_input(
    sym: Symbol,
    ops: dict[int, Operator],
    v: Tensor,
    faces: Faces,
    target: Tensor | None = None,
    keep: list | None = None,
) -> Tensor:
    """``v' = v + E_B delta``, ``delta = K_BB^+ (t_B - (L v)_B)`` per axis from the same ``v``
    (block Jacobi over axes; ``t`` = ``target``, default ``v``); ``(L v)_B`` from the symbol, not
    from the layer. ``keep``: a list that receives ``t_B`` per axis (the output of
    ``t.index_select(2 + axis, pos)``), for the forward hook.

    ``v`` (B, C, *grid) -> (B, C, *grid), a new tensor (``v`` is not modified).
    """
    dims = tuple(2 + axis for axis, _ in faces)
    idx = tuple(_index(pos, v.device) for _, pos in faces)
    mat = sym.box_matrix(v.dtype, v.device)
    if target is None:  # the box's first product and the faces of v in one autograd node
        f, *vbs = _Sample.apply(v, mat, dims, *idx)
    else:
        (f,) = _Sample.apply(v, mat, ())
        vbs = [target.index_select(a, i) for a, i in zip(dims, idx)]
    if keep is not None:
        keep.extend(vbs)
    y = sym.respond(sym.box_finish(f)).to(torch.complex128)  # spectrum of L v on the box
    out = v.clone()  # ours: updated in place below (one copy for every axis)
    for (axis, pos), a, i, vb in zip(faces, dims, idx, vbs):
        d = face_delta(sym, ops[axis], y, vb, axis, pos)
        d = sym.untangential(d, axis).to(v.dtype)  # (B, C, S, *tan)
        out.index_add_(a, i, d.movedim(2, a))
    return out


def refined_layer(
    sym: Symbol, ops: dict[int, Operator], v: Tensor, faces: Faces, v_faces: list
) -> Tensor:
    """The layer ``irfftn(H . rfftn(v))`` (no bias) with T2 applied to its spectrum: ``H (X +
    sum_axes Delta_axis)`` on the box, one inverse transform.

    ``v`` (B, C, *grid) -> (B, C, *grid). ``v_faces``: a list that receives the faces of ``v``
    per axis (read in the same autograd node as the box transform), for the forward hook.
    """
    dims = tuple(2 + axis for axis, _ in faces)
    idx = tuple(_index(pos, v.device) for _, pos in faces)
    f, *vbs = sym.box_fft_and_faces(v, dims, idx)
    v_faces.extend(vbs)
    y = sym.respond(f)  # H X on the box
    y128 = y.to(torch.complex128)
    total = None
    for (axis, pos), vb in zip(faces, v_faces):
        d = face_delta(sym, ops[axis], y128, vb, axis, pos)
        part = sym.face_spectrum(d.to(y.dtype), axis, pos)
        total = part if total is None else total + part
    if total is not None:
        y = y + sym.respond(total)
    return sym.box_ifft(y)
