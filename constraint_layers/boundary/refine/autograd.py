"""The refinement's own autograd functions (private).

Three nodes whose backward is written out instead of recorded op by op:

- :class:`_RegularisedSolve`: ``X = (K^H K + lam^2 I)^{-1} K^H R`` per tangential frequency from
  a Cholesky factor that is a constant for autograd; its gradient in ``K``, ``lam^2`` and ``R`` is
  the one autograd would take through ``cholesky`` and ``cholesky_solve``, in closed form;
- :class:`_Sample`: the first product of the box transform and the faces of the layer input, in
  one node (one gradient the size of the input);
- :class:`_Write`: T1's writes of the boundary rows, in one node (its backward copies the
  gradient once; later writes win where rows meet, as in the forward).

The box transform and the spectral product of a symbol (``_BoxFFT``, ``_Respond``) belong to
the symbol and live with it in :mod:`constraint_layers.boundary.spectral`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..spectral import cbmm

__all__ = ["_RegularisedSolve", "_Sample", "_Write", "_write"]


class _RegularisedSolve(torch.autograd.Function):
    """``X = (K^H K + lam^2 I)^{-1} K^H R`` per frequency, from the Cholesky factor ``L`` of
    ``K^H K + lam^2 I``, differentiable in ``K``, ``lam^2`` and ``R``.

    The gradient is the one autograd takes through ``cholesky`` and ``cholesky_solve``, in
    closed form: with ``Y = G^{-1} dX`` (one more solve with ``L``, ``G`` Hermitian),
    ``dR = K Y``, ``dK = (R - K X) Y^H - (K Y) X^H``, ``d(lam^2) = -Re sum(Y conj(X))``. No
    Cholesky backward (several triangular solves and products of ``(S C)^2`` matrices per
    frequency: most of the layer's backward). Under ``create_graph`` (double backward) it
    differentiates the plain expression instead.

    Shapes: ``K`` (T, N, N) complex128, ``lam2`` () real, ``R`` (T, N, B) complex128, ``L`` (T, N,
    N) complex128 and ``K^H`` (contiguous) (constants: recomputed from ``K`` and ``lam2`` where
    needed).
    """

    @staticmethod
    def forward(ctx, k: Tensor, lam2: Tensor, rhs: Tensor, chol: Tensor, kh: Tensor) -> Tensor:
        x = torch.cholesky_solve(cbmm(kh, rhs), chol)
        ctx.save_for_backward(k, lam2, rhs, chol, x)
        return x

    @staticmethod
    def backward(ctx, dx: Tensor):
        k, lam2, rhs, chol, x = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the plain expression, differentiably
            ins = (k, lam2, rhs)
            eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
            out = torch.cholesky_solve(
                cbmm(k.mH, rhs), torch.linalg.cholesky(cbmm(k.mH, k) + lam2 * eye)
            )
            want = [t for t in ins if t.requires_grad]
            got = iter(torch.autograd.grad(out, want, dx, create_graph=True) if want else ())
            return (*(next(got) if t.requires_grad else None for t in ins), None, None)
        need_k, need_lam, need_rhs = ctx.needs_input_grad[:3]
        y = torch.cholesky_solve(dx, chol)  # G^{-1} dX
        dk = dlam = drhs = None
        if need_k:  # [R - K X, -K Y] @ [Y^H; X^H]: one product (K Y and K X in one too)
            yx = torch.cat([y, x], -1)
            kyx = cbmm(k, yx)
            b = y.shape[-1]
            drhs = kyx[..., :b] if need_rhs else None
            left = torch.cat([rhs - kyx[..., b:], -kyx[..., :b]], -1)
            dk = cbmm(left, yx.mH)
        elif need_rhs:
            drhs = cbmm(k, y)
        if need_lam:
            dlam = -(y * x.conj()).real.sum().to(lam2.dtype)
        return dk, dlam, drhs, None, None


class _Sample(torch.autograd.Function):
    """``v @ mat`` over the last axis and the faces of ``v`` at ``idx[j]`` along ``dims[j]``, in
    one autograd node: its backward writes the faces' gradients into the product's (one
    gradient the size of ``v``, where separate ``index_select`` nodes would each add one).

    Shapes: ``v`` (B, C, *grid), ``mat`` (M_last, K) -> (B, C, *grid[:-1], K) and, per face
    set, ``v.index_select(dims[j], idx[j])``.
    """

    @staticmethod
    def forward(ctx, v: Tensor, mat: Tensor, dims: tuple[int, ...], *idx: Tensor):
        ctx.dims = dims
        ctx.save_for_backward(mat, *idx)
        lead = v.shape[:-1]
        f = (v.reshape(-1, v.shape[-1]) @ mat).reshape(*lead, mat.shape[-1])
        return (f, *(v.index_select(a, i) for a, i in zip(dims, idx)))

    @staticmethod
    def backward(ctx, df: Tensor, *dfaces: Tensor):
        mat, *idx = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return (None, None, None, *(None for _ in idx))
        lead = df.shape[:-1]
        dv = (df.reshape(-1, df.shape[-1]) @ mat.T).reshape(*lead, mat.shape[0])
        for a, i, g in zip(ctx.dims, idx, dfaces):
            if g is not None:
                dv.index_add_(a, i, g)
        return (dv, None, None, *(None for _ in idx))


def _write(out: Tensor, inplace: bool, writes: list[tuple[int, Tensor, Tensor]]) -> Tensor:
    """``out.index_copy(dim, index, rows)`` for each of ``writes`` in order (later rows win where
    they meet); ``inplace``: into ``out``. Rows expanded to the shape they replace."""
    if not writes:
        return out
    dims, idx, rows = zip(*writes)
    return _Write.apply(out, inplace, dims, idx, *rows)


class _Write(torch.autograd.Function):
    """The writes of :func:`_write` in one autograd node: its backward copies the gradient once
    (one ``index_copy`` node per write copies it per write)."""

    @staticmethod
    def forward(ctx, out, inplace: bool, dims: tuple[int, ...], idx: tuple[Tensor, ...], *rows):
        ctx.dims, ctx.idx = dims, idx
        res = out if inplace else out.clone()
        for a, i, r in zip(dims, idx, rows):
            res.index_copy_(a, i, r)
        if inplace:
            ctx.mark_dirty(res)
        return res

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone()
        drows = []
        for a, i in reversed(list(zip(ctx.dims, ctx.idx))):  # the last write saw the output
            drows.append(grad.index_select(a, i))
            grad.index_fill_(a, i, 0)
        return (grad, None, None, None, *reversed(drows))
