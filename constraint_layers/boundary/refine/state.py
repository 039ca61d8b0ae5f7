"""The refinement's state: the per-call plan, the ``Refinement`` object, its prepared factorisation
and caches (private).

- :class:`RefinementContext` switches the refinement of one wrapper on around its own calls.
  The state of a call (the physical grid, the faces to eliminate, the rows to write, what each
  layer's pre-hook leaves for its forward hook) lives in a context variable, so threads and async
  tasks calling one wrapper at different resolutions do not share it.
- :class:`Refinement` is the hook object of one layer: its options (``rcond``, ``refresh``,
  ``kernel_grad``, ``spectrum``), its prepared state (the symbol and the factorised ``K_BB^+`` per
  eliminated axis, :class:`_Prepared`) and its diagnostics (``stats``, ``t1_gap``). The hooks'
  work is in :mod:`~constraint_layers.boundary.refine.hooks`, the algebra in
  :mod:`~constraint_layers.boundary.refine.algebra`.

Caching. While gradients in the weights are recorded (training, ``refresh=1``) the prepared
state is rebuilt inside the autograd graph at every call, so gradients follow how ``K_BB^+``
depends on the weights. Without gradients it is cached and reused only while the weights are
equal, by value (any way of changing them: an optimizer step, ``p.data.copy_``, ``p.data = t``,
``n_modes``), and never across ``torch.inference_mode`` boundaries; a cache entry is replaced as
a whole, never mutated. ``refresh=k`` (k > 1) reuses a frozen factorisation for ``k`` weight
changes (approximate gradients, a lagging refinement); ``kernel_grad="detached"`` rebuilds it at
every call but as a constant for autograd.
"""

from __future__ import annotations

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
from ..spectral import SpectralKernel, Symbol, symbol_from_kernel
from . import hooks
from .algebra import (
    Faces,
    Operator,
    face_delta,
    probe_symbol,
    regularised_inverse,
    solve,
    update_input,
)
from .hooks import _NO_TRACE

__all__ = ["KERNEL_GRADS", "Refinement", "RefinementContext"]

#: The values of ``kernel_grad``.
KERNEL_GRADS = ("exact", "detached")

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


class Refinement:
    """Forward hook that refines one shift-invariant affine layer (see
    :mod:`constraint_layers.boundary.refine`).

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
        return probe_symbol(module, v, origin)

    def _build(
        self,
        module: torch.nn.Module,
        v: Tensor,
        kernel: SpectralKernel | None,
        faces: Faces,
        pads: tuple[int, ...],
    ) -> _Prepared:
        sym = symbol_from_kernel(kernel) if kernel is not None else self._probe(module, v, pads)
        return _Prepared(sym, {axis: self._operator(sym, axis, pos) for axis, pos in faces})

    def _prepared(
        self,
        module: torch.nn.Module,
        v: Tensor,
        kernel: SpectralKernel | None,
        faces: Faces,
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

    def _operator(self, sym: Symbol, axis: int, pos: tuple[int, ...]) -> Operator:
        """``K_BB^+`` of ``axis`` per tangential frequency, factorised
        (:func:`~constraint_layers.boundary.refine.algebra.regularised_inverse`); keeps its Gram
        matrices for :attr:`stats`."""
        op, gram = regularised_inverse(sym, axis, pos, self.rcond)
        self._grams[axis] = gram
        return op

    @staticmethod
    def _solve(op: Operator, rhs: Tensor) -> Tensor:
        """``K_BB^+ rhs`` per frequency: (T, S C, B) -> (T, S C, B)."""
        return solve(op, rhs)

    def _update(
        self,
        prep: _Prepared,
        v: Tensor,
        faces: Faces,
        target: Tensor | None = None,
        keep: list | None = None,
    ) -> Tensor:
        """T2 on the layer's input, ``v' = v + E_B delta``
        (:func:`~constraint_layers.boundary.refine.algebra.update_input`)."""
        return update_input(prep.symbol, prep.ops, v, faces, target, keep)

    def _delta(
        self, prep: _Prepared, y: Tensor, vb: Tensor, axis: int, pos: tuple[int, ...]
    ) -> Tensor:
        """T2's update of the faces of ``axis``
        (:func:`~constraint_layers.boundary.refine.algebra.face_delta`)."""
        return face_delta(prep.symbol, prep.ops[axis], y, vb, axis, pos)

    # --------------------------------------------------------------------------- the hooks
    def attach(self, layer: torch.nn.Module) -> list[Any]:
        """Register the two hooks on ``layer``; returns their handles.

        The pre-hook applies T2 to the layer's input (``v' = v + E_B delta``, so the layer itself
        computes ``A(v')`` in its one evaluation); the forward hook applies T1 to its output.
        A layer described exactly (``SpectralKernel.exact``) also gets its ``forward`` replaced
        while attached: T2 on its spectrum, in its one evaluation (:meth:`_fused`).
        """
        return hooks.attach(self, layer)

    def before(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook: T2, the update of the boundary inputs of every eliminated face
        (:func:`~constraint_layers.boundary.refine.hooks.pre_hook`)."""
        return hooks.pre_hook(self, module, args)

    def _fused(self, entry: dict, v: Tensor, output_shape: Any = None) -> Tensor:
        """The one-pass refined layer
        (:func:`~constraint_layers.boundary.refine.hooks.fused_forward`)."""
        return hooks.fused_forward(self, entry, v, output_shape)

    def __call__(self, module: torch.nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook: T1, the rows of every condition in order
        (:func:`~constraint_layers.boundary.refine.hooks.forward_hook`)."""
        return hooks.forward_hook(self, module, args, output)
