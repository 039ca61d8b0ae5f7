"""Kernel refinement of shift-invariant affine layers (private; used by ``mode="refine"``).

BOON (Saad et al., ICLR 2023) refines every Fourier layer ``A(v) = K v + c`` of a neural operator
so that the layer's boundary rows obey the boundary condition's structure:

Dirichlet and Neumann axes (elimination). ``K -> T1 K T2``, where ``T2`` (column operations: an
update of the boundary inputs) removes the coupling of the boundary rows to the interior and
``T1`` (row operations) writes the boundary rows. With ``L(v) = A(v) - A(0)`` and ``K_BB`` the
block of ``L`` from the boundary nodes to themselves::

    T2:  v'_B = v_B + K_BB^+ (v_B - (L v)_B),  v'_I = v_I      (then (L v')_B = v_B if exact)
    T1:  A~(v)_B = v_B + A(0)_B,               A~(v)_I = A(v')_I

so the refined layer passes its boundary values through (plus its bias) whatever the interior
holds, and its interior outputs see the boundary update ``L(E_B delta)``. Neumann uses the same
elimination on both faces (the paper's 1D code eliminates the right face only, its 2D code
both), without its stencil rows and global factor 1/2: the output step makes the flux exact.

Periodic axes (the paper's periodic kernel correction, ``K -> T K``): the layer's two end rows
become their average, ``A~(v)_low = A~(v)_high = (A(v)_low + A(v)_high) / 2``; no elimination.

Several conditions: the eliminations of all Dirichlet/Neumann axes are computed from the same
residual (a block-Jacobi step; measured against Jacobi sweeps in
``examples/boundary_paper/refine_rcond.py``), then the rows are written in the order the
conditions were given, so where two meet the later one holds, as in the output step.

How it is computed. The layer is a circular convolution on its (padded) grid, so everything
follows from its symbol ``H`` at the few frequencies where it responds (``spectral``):

- ``K_BB`` is block diagonal in the tangential Fourier basis: one ``(S C) x (S C)`` matrix per
  tangential frequency of the symbol (``S`` = number of constrained sides), Cholesky-factorised
  in float64;
- the residual ``v_B - (L v)_B`` needs the layer's output on the faces only: from the box of
  ``rfftn(v)`` and ``H``, a few small products;
- a layer that IS its description (``SpectralKernel.exact``: neuraloperator's own
  ``SpectralConv.forward`` in full precision) is evaluated from it in one pass
  (:meth:`Refinement._fused`, installed as the layer's ``forward`` while the refinement is
  attached): ``X`` = the spectrum of ``v`` on the box (an ``rfft`` along the last axis, FFTs of
  the kept columns along the others, the faces of ``v`` read in the same autograd node), ``y =
  H X``, the residual and ``delta`` per axis as above, then ``H (X + Delta)`` with ``Delta`` the
  box spectrum of the face update ``E_B delta`` (``sum_s delta_s(xi) exp(-2 pi i k p_s /
  M_a)``: small products, no field of the grid's size) and one inverse transform on the kept
  columns. The products with ``H`` are real batched products (``Symbol.respond``); outputs and
  gradients equal the two-hook path below to rounding (``tests/boundary/test_refine_fused.py``).
- any other layer (``add_refinement`` without a description, a subclass with its own forward),
  ``refresh`` > 1 (a frozen block) and ``kernel_grad="detached"`` while training: T2 is applied
  to the layer's INPUT by a forward pre-hook (``v' = v + E_B delta``), so the layer computes
  ``A(v') = A(v) + L(E_B delta)`` in its own one evaluation, with its current weights.

The forward hook writes the rows (T1) in both cases. No second evaluation of the layer.

The symbol comes in closed form from the weights when the adapter describes the layer
(``spectrum=``, a :class:`~constraint_layers.boundary.spectral.SpectralKernel`: neuraloperator's
``SpectralConv``, dense or factorised, any number of axes, with domain padding): no probing, and
gradients are exact at every training step (they follow how ``K_BB^+`` depends on the weights,
which dominates: freezing it changed a directional derivative from 4.00 to -0.023 in the
boundary-paper study and trained worse). Without a description (``add_refinement`` on another
shift-invariant layer) the symbol is read from one batched evaluation of the layer on ``C``
impulses and a zero input, inside the autograd graph while gradients are recorded.

State and caching. The per-call state (grid, faces) lives in a context variable, so threads and
async tasks calling one wrapper at different resolutions do not share it. Without gradients the
prepared factorisation is cached and reused only while the weights are equal, by value (any way
of changing them: an optimizer step, ``p.data.copy_``, ``p.data = t``, ``n_modes``), and never
across ``torch.inference_mode`` boundaries. ``refresh=k`` (k > 1) reuses a frozen factorisation
for ``k`` weight changes (approximate gradients, a lagging refinement); ``kernel_grad="detached"``
recomputes it at every call but as a constant for autograd (the study's "frozen" variant).
Constants of the grid (the box's DFT matrices and phases, index tensors) are cached per (grid,
box, dtype, device) and never depend on the weights. The ``K_BB^+`` solve is one autograd
function (``_RegularisedSolve``): its Cholesky factor is a constant for autograd and its gradient
in ``K``, ``lam^2`` and the right-hand side is autograd's through ``cholesky`` and
``cholesky_solve`` in closed form (one more solve with the factor).
``torch.jit.trace`` is refused: the refinement depends on the grid in ways a trace cannot record.
Under ``torch.autocast`` (bfloat16 / float16 inputs) the refinement runs with autocast off in
float32, as a stock ``SpectralConv`` runs its FFTs; the refined layer returns float32, as the
stock one does, and the model's next layers run under autocast again.
Activation checkpointing of a refined layer is not supported (its recomputation runs outside the
wrapper's call). neuraloperator's ``SpectralConv`` is not shift invariant on grids with an odd
size along an axis other than the last (it applies ``fftshift`` twice); the adapter refuses those.

Ill-conditioned ``K_BB`` (the rule: a smooth kernel sees the two end nodes of a periodic grid
almost alike): ``K_BB^+ = (K^H K + lam^2 I)^{-1} K^H`` with ``lam = rcond`` times the largest
Frobenius norm of the per-frequency blocks (``>=`` their largest singular value; differentiable
without an SVD, whose backward cost more than the layer) (``rcond=0``: the pseudo-inverse).
Directions far above ``lam`` are inverted to rounding, those near or below it are damped instead
of blowing up; ``T1`` keeps the boundary rows exact either way. Default ``rcond=1e-2``, from
trained accuracy (``examples/boundary_paper``, 3 seeds; RESULTS.md "rcond"): heat single step
relative L2 0.488 / 0.055 / 0.021 / 0.025 at rcond 1e-5 / 1e-3 / 1e-2 / 1e-1 (plain FNO 0.077),
Burgers Dirichlet 0.957 / 0.172 / 0.133 / 0.110 (FNO 0.121), heat over 13 frames 0.949 / - /
0.265 / 0.290 (FNO 0.320) at the quick budget; at the medium budget heat 0.0045 (1e-2) / 0.0052
(1e-1) against 0.0083 and Burgers Dirichlet 0.035 (1e-2) against 0.059. Closer to exact
elimination is not better trained: ``examples/boundary_paper/refine_rcond.py`` (fresh layers,
float64, 1D Dirichlet N = 64) puts the refined interior within 4e-9 / 1e-6 / 1e-3 of exact
elimination (relative to the size of the exact update) for C = 1 / 4 / 32 channels at rcond
1e-5 (smallest relative singular value of ``K_BB`` 0.19 / 1e-2 / 1e-3), and 3.5e-3 / 0.53 /
0.97 at 1e-2; exact elimination moves the interior by 0.05x / 4x / 7x the layer's output norm
there, and training through that amplification fails (1e-5 above).

Measured limitation of the block-Jacobi step (same script, 2D, Dirichlet on x and Neumann on
y): it does not reduce the boundary residual that T1 has to overwrite (ratio 1.05 to 12 of the
residual before T2, C = 1 to 32) and repeated sweeps diverge, while on one axis it removes it
to rounding. A joint T2 over all faces of both axes (dense, 24 x 24 grid, C = 1 and 4) removes
it to rounding (ratio 2e-15 / 1e-14 with the pseudo-inverse) and its refined interior differs
from the block-Jacobi one by 100% / 120% of its update: the joint T2 is the faithful one. It
does not train better: on the lid-driven cavity (two Dirichlet axes, the only paper problem
with several constrained axes) a dense joint T2 with the same regularisation
(``examples/boundary_paper/refine_joint.py``, 3 seeds) gave relative L2 0.1277 (SE 0.0061)
against the block-Jacobi 0.1239 (0.012) at the quick budget and 0.04829 (0.0024) against
0.04806 (0.0014) at the medium one (paired differences within one SE, changing sign between
seeds), at 6.4x to 7.3x the time per training step, while it removed 83% to 94% of each
trained layer's frame residual where block Jacobi multiplies it by 2.1 to 2.7. So the library
keeps block Jacobi; the joint T2 (``C`` times ``2 (M_x + M_y)`` unknowns, a dense solve per
layer and step) stays an experiment.
T1 keeps every layer's boundary rows independent of the interior either way.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import GridError
from ..conditions import Periodic
from ..spectral import (
    SpectralKernel,
    Symbol,
    cbmm,
    symbol_from_kernel,
    symbol_from_response,
)

__all__ = ["KERNEL_GRADS", "Refinement", "RefinementContext"]

#: The values of ``kernel_grad``.
KERNEL_GRADS = ("exact", "detached")

_NO_TRACE = (
    "mode='refine' cannot be traced with torch.jit.trace: the refinement depends on the grid, "
    "which a trace would freeze (wrong results at other resolutions). Trace the model without "
    "the wrapper, or use mode='output'."
)

# id(RefinementContext) -> _Call of the wrapper call in progress (per thread / async task)
_CALLS: ContextVar[dict[int, _Call]] = ContextVar("constraint_layers_refine_calls")


@dataclass(frozen=True)
class _Call:
    """What the refined layers need to know about one wrapper call."""

    #: The physical grid shape of the call (the model input's spatial shape).
    grid: tuple[int, ...]
    #: Axes with elimination (Dirichlet / Neumann) -> their sides, in order of appearance.
    eliminate: dict[int, tuple[str, ...]]
    #: The rows to write, in the order of the conditions: ("pass", axis, sides) for an
    #: eliminated face, ("average", axis, ()) for a periodic axis.
    rows: tuple[tuple[str, int, tuple[str, ...]], ...]
    #: Per refined layer (id of its hook), what its pre-hook left for its forward hook: a stack,
    #: for layers called more than once in one model call. Private to this call.
    pending: dict[int, list[dict]] = field(default_factory=dict)


def _plan(bcs: Sequence[Any], inputs: Any, call: str) -> _Call:
    if not isinstance(inputs, Tensor) or inputs.ndim < 3:
        raise GridError(
            f"{call}: expected the model input to be a channel-first grid tensor "
            f"(batch, channels, d1, ..., dn), got "
            f"{type(inputs).__name__}{tuple(inputs.shape) if isinstance(inputs, Tensor) else ''}."
        )
    grid = tuple(inputs.shape[2:])
    eliminate: dict[int, list[str]] = {}
    rows = []
    for bc in bcs:
        d = bc.axis(len(grid), call)
        if isinstance(bc, Periodic):
            rows.append(("average", d, ()))
            continue
        sides = eliminate.setdefault(d, [])
        sides += [s for s in bc.sides if s not in sides]
        rows.append(("pass", d, tuple(bc.sides)))
    return _Call(grid, {d: tuple(s) for d, s in eliminate.items()}, tuple(rows))


class RefinementContext:
    """Switches the refinement of one wrapper on around its own calls.

    The state of a call is kept in a context variable: each thread (and async task) sees only
    the calls it is making, so concurrent calls at different resolutions do not interfere.
    """

    @contextmanager
    def call(self, bcs: Sequence[Any], inputs: Any, name: str = "refine") -> Iterator[None]:
        """Refine the hooked layers for the duration of the block.

        Parameters
        ----------
        bcs : sequence of BoundaryCondition
            The conditions, in the order they are applied.
        inputs : Tensor
            The model input, shape (batch, channels, d1, ..., dn): gives the physical grid.
        name : str
            The caller's name, for error messages.
        """
        if torch.jit.is_tracing():
            raise NotImplementedError(_NO_TRACE)
        state = _plan(bcs, inputs, name)
        calls = dict(_CALLS.get({}))
        calls[id(self)] = state
        token = _CALLS.set(calls)
        try:
            yield
        finally:
            _CALLS.reset(token)

    def current(self) -> _Call | None:
        """The state of this wrapper's call in progress in this thread, or ``None``."""
        return _CALLS.get({}).get(id(self))


@dataclass(frozen=True)
class _Prepared:
    """The symbol and the ``K_BB^+`` operators of one layer at one grid."""

    symbol: Symbol
    ops: dict[int, tuple[Tensor, ...]]  # axis -> factorised K_BB^+ (Refinement._operator)


@dataclass(frozen=True)
class _Entry:
    """A cache entry: replaced as a whole, never mutated (safe to read from any thread)."""

    key: tuple
    weights: tuple[Tensor, ...]
    changes: int
    prepared: _Prepared


def _same(a: Sequence[Tensor], b: Sequence[Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b)
    )


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


class Refinement:
    """Forward hook that refines one shift-invariant affine layer (see the module docstring).

    Parameters
    ----------
    context : RefinementContext
        Shared with the wrapper, which switches it on around its own calls only: the model called
        on its own is not refined.
    rcond : float
        Relative Tikhonov parameter of the ``K_BB`` solve (0: pseudo-inverse).
    refresh : int
        1 (default): without gradients the factorisation is reused while the weights are equal,
        with gradients it is rebuilt inside the autograd graph at every call (exact gradients).
        k > 1: a frozen factorisation (a constant for autograd) serves until the weights have
        changed k times (compared by value), with or without gradients: approximate gradients
        (T1 keeps the rows exact either way); the layer then runs its own forward on the
        updated input, which for a stock neuraloperator ``SpectralConv`` is slower than the
        default's one-pass evaluation (``README.md``, "Performance").
    kernel_grad : {"exact", "detached"}
        ``"detached"``: rebuild at every call but outside the autograd graph (``K_BB^+`` and the
        coupling are constants for the gradient).
    spectrum : callable, optional
        ``spectrum(grid) -> SpectralKernel``: the layer's weights at its retained modes on the
        given grid (closed form). Default: measure the symbol by evaluating the layer on impulses.
    """

    def __init__(
        self,
        context: RefinementContext,
        rcond: float = 1e-2,
        refresh: int = 1,
        kernel_grad: str = "exact",
        spectrum: Callable[[tuple[int, ...]], SpectralKernel] | None = None,
    ) -> None:
        self.context = context
        self.rcond = rcond
        self.refresh = refresh
        self.kernel_grad = kernel_grad
        self.spectrum = spectrum
        # key -> entry; the dict is replaced, never mutated, so readers in other threads see a
        # consistent one (a few grids at most: mixed-resolution inference)
        self._cache: dict[tuple, _Entry] = {}
        # diagnostics, kept as detached tensors and evaluated only when read
        self._grams: dict[int, Tensor] = {}
        # (rows before T1, boundary inputs, A(0) there) per eliminated axis, of the last call
        self._gap: list[tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def stats(self) -> dict[int, float]:
        """Smallest singular value of K_BB relative to the largest, per axis, from the last
        factorisation (frequencies where the layer does not respond at all left out)."""
        out = {}
        for axis, gram in list(self._grams.items()):
            eig = torch.linalg.eigvalsh(gram).clamp_min(0)
            smax2 = float(eig.max())
            eig = eig if smax2 > 0 else None
            live = None if eig is None else eig[..., -1] > 1e-10 * smax2
            if live is None or not bool(live.any()):
                out[axis] = 0.0
            else:
                out[axis] = math.sqrt(float(eig[live][..., 0].min()) / smax2)
        return out

    @property
    def t1_gap(self) -> float:
        """How far the T2 update left the boundary rows from the boundary inputs before T1
        wrote them in the last call, relative to max |v_B| (rounding when K_BB is well
        conditioned and rcond small); NaN before the first call."""
        parts = self._gap
        if parts is None:
            return float("nan")
        gap = max(float((ob - bb - vb).abs().amax()) for ob, vb, bb in parts)
        vmax = max(float(vb.abs().amax()) for _, vb, _ in parts)
        return gap / (vmax + 1e-30)

    # ---------------------------------------------------------------------- the symbol
    def _kernel(self, grid: tuple[int, ...], channels: int) -> SpectralKernel | None:
        if self.spectrum is None:
            return None
        kernel = self.spectrum(grid)
        w = kernel.weight
        if tuple(kernel.grid) != grid:
            raise GridError(
                f"mode='refine': the layer's spectral description is for the grid "
                f"{tuple(kernel.grid)}, but the layer runs on {grid}."
            )
        if w.shape[0] != channels or w.shape[1] != channels:
            raise GridError(
                "mode='refine': a refined layer must map C channels to C channels (its boundary "
                f"outputs become its boundary inputs), got {w.shape[0]} -> {w.shape[1]} for an "
                f"input with {channels} channels."
            )
        return kernel

    def _probe(self, module: torch.nn.Module, v: Tensor, origin: tuple[int, ...]) -> Symbol:
        """The symbol from one batched evaluation on ``C`` impulses at ``origin`` and zero."""
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

    def _build(
        self,
        module: torch.nn.Module,
        v: Tensor,
        kernel: SpectralKernel | None,
        faces: tuple[tuple[int, tuple[int, ...]], ...],
        pads: tuple[int, ...],
    ) -> _Prepared:
        sym = symbol_from_kernel(kernel) if kernel is not None else self._probe(module, v, pads)
        return _Prepared(sym, {axis: self._operator(sym, axis, pos) for axis, pos in faces})

    def _prepared(
        self,
        module: torch.nn.Module,
        v: Tensor,
        kernel: SpectralKernel | None,
        faces: tuple[tuple[int, tuple[int, ...]], ...],
        pads: tuple[int, ...],
    ) -> _Prepared:
        grid = tuple(v.shape[2:])
        if kernel is not None:
            weights: tuple[Tensor, ...] = (kernel.weight, *kernel.freqs)
        else:
            weights = tuple(module.parameters()) + tuple(module.buffers())
        recording = torch.is_grad_enabled() and any(t.requires_grad for t in weights)
        if recording and self.kernel_grad == "detached":
            with torch.no_grad():
                return self._build(module, v, kernel, faces, pads)
        if recording and self.refresh == 1:
            # training: in the autograd graph, so that gradients follow how K_BB^+ and the
            # coupling depend on the weights (exact gradients)
            return self._build(module, v, kernel, faces, pads)
        key = (grid, faces, v.dtype, v.device, torch.is_inference_mode_enabled())
        entry = self._cache.get(key)
        if entry is not None:
            if _same(entry.weights, weights):
                return entry.prepared
            if entry.changes + 1 < self.refresh:  # frozen for `refresh` weight changes
                snap = tuple(t.detach().clone() for t in weights)
                self._store(_Entry(key, snap, entry.changes + 1, entry.prepared))
                return entry.prepared
        with torch.no_grad():
            snap = tuple(t.detach().clone() for t in weights)
            prepared = self._build(module, v, kernel, faces, pads)
        self._store(_Entry(key, snap, 0, prepared))
        return prepared

    def _store(self, entry: _Entry, size: int = 8) -> None:
        cache = {k: e for k, e in self._cache.items() if k != entry.key}
        cache[entry.key] = entry
        self._cache = dict(list(cache.items())[-size:])

    def _operator(self, sym: Symbol, axis: int, pos: tuple[int, ...]) -> tuple[Tensor, ...]:
        """``K_BB^+`` per tangential frequency, factorised: ``(L, K, lam^2, K^H)`` with ``L`` the
        Cholesky factor of ``K^H K + lam^2 I`` ((T, S C, S C), complex128; a constant for
        autograd, see :class:`_RegularisedSolve`); or, when ``K`` is a constant (built without
        gradients: inference, a frozen or detached block) or for rcond 0, ``(K_BB^+,)`` as one
        matrix per frequency (one product per call)."""
        k = sym.boundary_block(axis, pos).to(torch.complex128)
        if self.rcond == 0:
            with torch.no_grad():
                self._grams[axis] = cbmm(k.mH.contiguous(), k)
            return (torch.linalg.pinv(k),)
        # lam = rcond * the largest Frobenius norm over the frequencies: it follows the weights
        # (a constant lam would leave a term out of the gradient) and costs no SVD; the largest
        # block is found without gradients, its norm taken with them (the gradient of amax)
        with torch.no_grad():
            top = torch.view_as_real(k).square().sum(dim=(-3, -2, -1)).argmax()
        lam2 = self.rcond**2 * torch.view_as_real(k[top]).square().sum()
        with torch.no_grad():
            kh = k.mH.contiguous()  # K^H for the forward product (a constant, like chol)
            gram = cbmm(kh, k)
            self._grams[axis] = gram
            eye = torch.eye(k.shape[-1], dtype=gram.dtype, device=gram.device)
            chol = torch.linalg.cholesky(gram + lam2 * eye)
            if not k.requires_grad:  # a constant operator: the regularised inverse, explicitly
                return (torch.cholesky_solve(kh, chol),)
        return (chol, k, lam2, kh)

    @staticmethod
    def _solve(op: tuple[Tensor, ...], rhs: Tensor) -> Tensor:
        """``K_BB^+ rhs`` per frequency: (T, S C, B) -> (T, S C, B)."""
        if len(op) == 1:
            return cbmm(op[0], rhs)
        chol, k, lam2, kh = op
        return _RegularisedSolve.apply(k, lam2, rhs, chol, kh)

    # --------------------------------------------------------------------------- the hooks
    def attach(self, layer: torch.nn.Module) -> list[Any]:
        """Register the two hooks on ``layer``; returns their handles.

        The pre-hook applies T2 to the layer's input (``v' = v + E_B delta``, so the layer itself
        computes ``A(v')`` in its one evaluation); the forward hook applies T1 to its output.
        """
        handles = [layer.register_forward_pre_hook(self.before), layer.register_forward_hook(self)]
        if self.spectrum is not None:
            handles.append(_FusedForward.install(layer, self))
        return handles

    def _pads(self, v: Tensor, output_grid: tuple[int, ...] | None, phys: tuple[int, ...]):
        grid = tuple(v.shape[2:])
        if output_grid is not None and output_grid != grid:
            raise GridError(
                "mode='refine': a refined layer must keep its grid (got input grid "
                f"{grid}, output grid {output_grid}); layers that resample "
                "(resolution_scaling_factor, output_shape, UNO scalings) are not supported."
            )
        if len(phys) != len(grid):
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
        return tuple(pads)

    @staticmethod
    def _position(pads: tuple[int, ...], phys: tuple[int, ...], axis: int, side: str) -> int:
        return pads[axis] if side == "low" else pads[axis] + phys[axis] - 1

    def before(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: T2, the update of the boundary inputs of every eliminated face."""
        call = self.context.current()
        if call is None or not call.rows:
            return None
        if torch.jit.is_tracing():
            raise NotImplementedError(_NO_TRACE)
        v = v_in = args[0]
        if not isinstance(v, Tensor) or v.ndim < 3:
            raise GridError(
                "mode='refine': a refined layer must take a channel-first grid tensor "
                f"(batch, channels, d1, ..., dn), got {type(v).__name__}."
            )
        with _full_precision(v) as dtype:
            if v.dtype != dtype:  # autocast's bfloat16 / float16: refine in the layer's precision
                v = v.to(dtype)
                args = (v, *args[1:])
            out = self._before(module, call, v, args)
        return args if out is None and args[0] is not v_in else out

    def _before(self, module: torch.nn.Module, call: _Call, v: Tensor, args: tuple):
        phys = call.grid
        pads = self._pads(v, None, phys)
        faces = tuple(
            (axis, tuple(self._position(pads, phys, axis, s) for s in sides))
            for axis, sides in call.eliminate.items()
        )
        entry: dict[str, Any] = {"v": v, "pads": pads, "faces": faces, "bias": None}
        call.pending.setdefault(id(self), []).append(entry)
        if not faces:  # periodic only: no elimination
            return None
        grid = tuple(v.shape[2:])
        c = v.shape[1]
        kernel = self._kernel(grid, c)
        prep = self._prepared(module, v, kernel, faces, pads)
        if kernel is not None:
            bias = None if kernel.bias is None else kernel.bias.to(v.dtype)
        else:
            bias = module.forward(torch.zeros_like(v[:1]))  # A(0), with grad: a batch of one
        entry["bias"] = bias
        entry["v_faces"] = kept = []
        # the fused pass uses the prepared symbol for the layer's own product too: only where
        # it holds the current weights (refresh=1: reused only while they are equal) and, when
        # gradients in the weights are recorded, is built in the graph (kernel_grad="exact")
        recording = torch.is_grad_enabled() and kernel is not None and kernel.weight.requires_grad
        if (
            kernel is not None
            and kernel.exact
            and isinstance(module.forward, _FusedForward)
            and self.refresh == 1
            and (self.kernel_grad == "exact" or not recording)
        ):
            # the layer is its description: T2 on the spectrum, in the layer's one evaluation
            # (_FusedForward), the input left as it is
            entry["fused"] = (prep, kernel.bias)
            return None
        return (self._update(prep, v, faces, keep=kept), *args[1:])

    def _fused(self, entry: dict, v: Tensor, output_shape: Any = None) -> Tensor:
        """The layer ``irfftn(H . rfftn(v)) + bias`` with T2 applied to its spectrum: ``H (X +
        sum_axes Delta_axis)`` on the box, ``Delta_axis`` the spectrum of the face update
        ``E_B delta`` (a few small products, no field of the grid's size), one inverse
        transform. The rows (T1) are written by the forward hook."""
        prep, bias = entry["fused"]
        sym = prep.symbol
        grid = tuple(v.shape[2:])
        if output_shape is not None and tuple(output_shape) != grid:
            self._pads(v, tuple(output_shape), grid)  # raises: a refined layer keeps its grid
        dims = tuple(2 + axis for axis, _ in entry["faces"])
        idx = tuple(_index(pos, v.device) for _, pos in entry["faces"])
        f, *vbs = sym.box_fft_and_faces(v, dims, idx)
        entry["v_faces"].extend(vbs)
        y = sym.respond(f)  # H X on the box
        y128 = y.to(torch.complex128)
        total = None
        for (axis, pos), vb in zip(entry["faces"], entry["v_faces"]):
            d = self._delta(prep, y128, vb, axis, pos)
            part = sym.face_spectrum(d.to(y.dtype), axis, pos)
            total = part if total is None else total + part
        if total is not None:
            y = y + sym.respond(total)
        out = sym.box_ifft(y)
        entry["done"] = True
        return out if bias is None else out + bias

    def _update(
        self,
        prep: _Prepared,
        v: Tensor,
        faces,
        target: Tensor | None = None,
        keep: list | None = None,
    ) -> Tensor:
        """``v' = v + E_B delta``, ``delta = K_BB^+ (t_B - (L v)_B)`` per axis from the same
        ``v`` (block Jacobi over axes; ``t`` = ``target``, default ``v``); ``(L v)_B`` from the
        symbol, not from the layer. ``keep``: a list that receives ``t_B`` per axis (the output
        of ``t.index_select(2 + axis, pos)``), for the forward hook."""
        sym = prep.symbol
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
            d = self._delta(prep, y, vb, axis, pos)
            d = sym.untangential(d, axis).to(v.dtype)  # (B, C, S, *tan)
            out.index_add_(a, i, d.movedim(2, a))
        return out

    def _delta(
        self, prep: _Prepared, y: Tensor, vb: Tensor, axis: int, pos: tuple[int, ...]
    ) -> Tensor:
        """T2's update of the faces at ``pos`` along ``axis``, ``K_BB^+ (v_B - (L v)_B)``, in
        the tangential Fourier layout: ``y`` the spectrum of ``L v`` on the box (complex128),
        ``vb`` the layer input's faces (``v.index_select(2 + axis, pos)``). Returns (B, C, S,
        T), complex128."""
        sym = prep.symbol
        vb = vb.movedim(2 + axis, 2).to(torch.float64)  # (B, C, S, *tan)
        r = sym.tangential(vb, axis) - sym.face_values(y, axis, pos)  # (B, C, S, T)
        b, c, s, t = r.shape
        vec = r.permute(3, 2, 1, 0).reshape(t, s * c, b)
        return self._solve(prep.ops[axis], vec).reshape(t, s, c, b).permute(3, 2, 1, 0)

    def __call__(self, module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook: T1, the rows of every condition in order."""
        call = self.context.current()
        if call is None or not call.rows:
            return None
        with _full_precision(output) as dtype:
            return self._rows(call, output.to(dtype))

    def _rows(self, call: _Call, output: Tensor) -> Tensor | None:
        stack = call.pending.get(id(self))
        if not stack:
            raise GridError(
                "mode='refine': the refined layer's forward hook ran without its pre-hook; "
                "attach the refinement with Refinement.attach(layer)."
            )
        entry = stack.pop()
        if "fused" in entry and not entry.get("done"):
            raise GridError(
                "mode='refine': the refined layer's forward did not run the refinement: its "
                "forward was replaced while the refinement's pre-hook was running, or a forward "
                "pre-hook registered after the refinement's changed the shape of its input "
                f"(expected {tuple(entry['v'].shape)}). Attach the refinement again "
                "(constraint_layers.unwrap, then wrap) after changing the layer."
            )
        v, pads, faces, bias = entry["v"], entry["pads"], entry["faces"], entry["bias"]
        phys = call.grid
        self._pads(v, tuple(output.shape[2:]), phys)
        out = output
        v_faces = dict(zip((axis for axis, _ in faces), entry.get("v_faces", ())))
        if faces:
            # diagnostics on the faces only, evaluated lazily by t1_gap: the rows before T1
            with torch.no_grad():
                parts = []
                for (axis, pos), vb in zip(faces, v_faces.values()):
                    a = 2 + axis
                    ob = out.index_select(a, _index(pos, out.device))
                    bb = _faces_of(bias, a, pos, vb).detach()
                    parts.append((ob, vb.detach(), bb))
                self._gap = parts
        # T1, in the order of the conditions. A layer described by `spectrum` (a spectral
        # convolution) returns a fresh tensor that nothing else holds: its rows are written in
        # place (autograd still checks the versions); any other layer's output is left alone.
        inplace = self.spectrum is not None
        writes: list[tuple[int, Tensor, Tensor]] = []  # consecutive rows that pass values
        for kind, axis, sides in call.rows:
            a = 2 + axis
            if kind == "average":
                out = _write(out, inplace, writes)
                writes = []
                ends = [self._position(pads, phys, axis, s) for s in ("low", "high")]
                idx = _index(tuple(ends), out.device)
                rows = out.index_select(a, idx)
                rows = rows.mean(dim=a, keepdim=True).expand_as(rows)
                out = out.index_copy_(a, idx, rows) if inplace else out.index_copy(a, idx, rows)
                continue
            pos = tuple(self._position(pads, phys, axis, side) for side in sides)
            rows = _rows_of(v, v_faces, dict(faces), axis, pos)
            rows = rows + _faces_of(bias, a, pos, rows) if bias is not None else rows
            rows = rows.expand(*out.shape[:a], len(pos), *out.shape[a + 1 :])
            writes.append((a, _index(pos, out.device), rows))
        return _write(out, inplace, writes)


class _FusedForward:
    """The ``forward`` of a layer refined in one pass (an instance attribute of the layer while
    the refinement is attached; :meth:`remove` restores the previous one).

    Inside the wrapper's call, when the pre-hook found the layer described exactly
    (``SpectralKernel.exact``), it evaluates the refined layer from the description
    (:meth:`Refinement._fused`); otherwise, and outside the wrapper's calls, it runs the
    layer's own forward. The parameters and buffers are the layer's: ``state_dict`` is
    unchanged.
    """

    def __init__(self, layer: torch.nn.Module, refinement: Refinement, previous: Any) -> None:
        self.layer = layer
        self.refinement = refinement
        self.previous = previous  # the instance's own forward, if it had one

    @classmethod
    def install(cls, layer: torch.nn.Module, refinement: Refinement) -> _FusedForward:
        fused = cls(layer, refinement, layer.__dict__.get("forward"))
        layer.forward = fused
        return fused

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self.refinement.context.current()
        stack = None if call is None else call.pending.get(id(self.refinement))
        entry = stack[-1] if stack else None
        if entry is not None and "fused" in entry and not entry.get("done"):
            v = args[0] if args else None
            same = isinstance(v, Tensor) and v.shape == entry["v"].shape
            if same and set(kwargs) <= {"output_shape"}:
                # the layer refines what it receives (a forward pre-hook registered after the
                # refinement's may have replaced the input; the rows of T1 follow it)
                entry["v"] = v
                with _full_precision(v):
                    return self.refinement._fused(entry, v, *args[1:], **kwargs)
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.layer).forward(self.layer, *args, **kwargs)

    def remove(self) -> None:
        """Restore the layer's previous forward (if this one is still in place)."""
        if self.layer.__dict__.get("forward") is self:
            del self.layer.forward
            if self.previous is not None:
                self.layer.forward = self.previous


#: Input dtypes below the precision the refinement computes in (autocast's).
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextmanager
def _full_precision(v: Tensor) -> Iterator[torch.dtype]:
    """Autocast off for the refinement's own arithmetic; yields the dtype to compute in: ``v``'s,
    or float32 for bfloat16 / float16 (what a stock ``SpectralConv`` does under autocast: its
    FFTs run in float32 and it returns float32)."""
    dtype = torch.float32 if v.dtype in _LOW_PRECISION else v.dtype
    try:
        enabled = torch.is_autocast_enabled(v.device.type)
    except TypeError:  # torch < 2.4 takes no device type: switch it off regardless
        enabled = True
    if not enabled:
        yield dtype
        return
    with torch.autocast(v.device.type, enabled=False):
        yield dtype


@functools.lru_cache(maxsize=256)
def _index(pos: tuple[int, ...], device: torch.device) -> Tensor:
    """The positions as an index tensor (a constant, shared: never written to)."""
    with torch.inference_mode(False), torch.no_grad():
        return torch.tensor(pos, dtype=torch.long, device=device)


def _faces_of(bias: Tensor | None, a: int, pos: tuple[int, ...], like: Tensor) -> Tensor:
    """``A(0)`` at the positions ``pos`` along dim ``a``, broadcastable to ``like`` (the faces
    of the layer input there); a zero for no bias."""
    if bias is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    bias = bias.reshape((1,) * (like.ndim - bias.ndim) + tuple(bias.shape))
    if bias.shape[a] == 1:  # constant along the axis (neuraloperator's bias: (C, 1, ..., 1))
        return bias
    return bias.index_select(a, _index(pos, bias.device))


def _rows_of(v: Tensor, v_faces: dict, faces: dict, axis: int, pos: tuple[int, ...]) -> Tensor:
    """The layer input at ``pos`` along ``axis``: from the faces T2 read, else from ``v``."""
    have = faces.get(axis)
    vb = v_faces.get(axis)
    a = 2 + axis
    if vb is None or have is None or any(p not in have for p in pos):
        return v.index_select(a, _index(pos, v.device))
    if tuple(pos) == tuple(have):
        return vb
    return vb.index_select(a, _index(tuple(have.index(p) for p in pos), v.device))


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
