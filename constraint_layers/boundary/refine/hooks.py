"""The refinement's hooks on a layer (private).

:func:`attach` registers, on each refined layer, a forward pre-hook (:func:`pre_hook`: T2) and a
forward hook (:func:`forward_hook`: T1); a layer described exactly by its weights
(``SpectralKernel.exact``: neuraloperator's own ``SpectralConv.forward`` in full precision) also
gets its ``forward`` replaced by :class:`_FusedForward` while the refinement is attached.

- T2, two-hook path (any other layer, ``refresh`` > 1, ``kernel_grad="detached"`` while
  training): the pre-hook replaces the layer's input by ``v' = v + E_B delta``, so the layer
  computes ``A(v') = A(v) + L(E_B delta)`` in its own one evaluation, with its current weights.
- T2, one-pass path: the pre-hook prepares the symbol and leaves the input as it is; the
  replaced ``forward`` evaluates the refined layer from the symbol (:func:`fused_forward`: T2
  applied to the spectrum, one inverse transform).
- T1, both paths: the forward hook writes the rows of every condition in the order given, the
  eliminated faces' rows equal to the layer's boundary inputs plus ``A(0)`` there, the periodic
  axes' two end rows equal to their average. Where two conditions meet the later one holds.

No hook does anything outside the wrapper's calls (the layer called on its own is not refined).
The refinement computes with autocast off, in the input's dtype, or float32 for bfloat16 /
float16 inputs (what a stock ``SpectralConv`` does under autocast). ``torch.jit.trace`` is
refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...errors import GridError
from .algebra import _index, refined_layer
from .autograd import _write

if TYPE_CHECKING:
    from .state import Refinement, _Call

__all__ = [
    "attach",
    "forward_hook",
    "fused_forward",
    "layer_pads",
    "position",
    "pre_hook",
]

_NO_TRACE = (
    "mode='refine' cannot be traced with torch.jit.trace: the refinement depends on the grid, "
    "which a trace would freeze (wrong results at other resolutions). Trace the model without "
    "the wrapper, or use mode='output'."
)


def attach(ref: Refinement, layer: torch.nn.Module) -> list[Any]:
    """Register the refinement ``ref``'s two hooks on ``layer`` (and, for a layer it describes,
    the one-pass ``forward``); returns their handles (each has ``remove()``)."""
    handles = [layer.register_forward_pre_hook(ref.before), layer.register_forward_hook(ref)]
    if ref.spectrum is not None:
        handles.append(_FusedForward.install(layer, ref))
    return handles


def layer_pads(
    v: Tensor, output_grid: tuple[int, ...] | None, phys: tuple[int, ...]
) -> tuple[int, ...]:
    """The domain padding of the layer's grid around the physical grid ``phys``, per axis
    (symmetric); raises where the layer changes its grid or the physical grid does not fit."""
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


def position(pads: tuple[int, ...], phys: tuple[int, ...], axis: int, side: str) -> int:
    """The index on the layer's grid of the ``side`` face of ``axis``."""
    return pads[axis] if side == "low" else pads[axis] + phys[axis] - 1


def pre_hook(ref: Refinement, module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: T2, the update of the boundary inputs of every eliminated face."""
    call = ref.context.current()
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
        out = _prepare_call(ref, module, call, v, args)
    return args if out is None and args[0] is not v_in else out


def _prepare_call(ref: Refinement, module: torch.nn.Module, call: _Call, v: Tensor, args: tuple):
    """The pre-hook's work: the layer's entry for this call (what the forward hook and the
    one-pass forward need), and the updated input of the two-hook path (None: input kept)."""
    phys = call.grid
    pads = layer_pads(v, None, phys)
    faces = tuple(
        (axis, tuple(position(pads, phys, axis, s) for s in sides))
        for axis, sides in call.eliminate.items()
    )
    entry: dict[str, Any] = {"v": v, "pads": pads, "faces": faces, "bias": None}
    call.pending.setdefault(id(ref), []).append(entry)
    if not faces:  # periodic only: no elimination
        return None
    grid = tuple(v.shape[2:])
    c = v.shape[1]
    kernel = ref._kernel(grid, c)
    prep = ref._prepared(module, v, kernel, faces, pads)
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
        and ref.refresh == 1
        and (ref.kernel_grad == "exact" or not recording)
    ):
        # the layer is its description: T2 on the spectrum, in the layer's one evaluation
        # (_FusedForward), the input left as it is
        entry["fused"] = (prep, kernel.bias)
        return None
    return (ref._update(prep, v, faces, keep=kept), *args[1:])


def fused_forward(ref: Refinement, entry: dict, v: Tensor, output_shape: Any = None) -> Tensor:
    """The layer ``irfftn(H . rfftn(v)) + bias`` with T2 applied to its spectrum (see
    :func:`~constraint_layers.boundary.refine.algebra.refined_layer`); the rows (T1) are written
    by the forward hook. ``v`` (B, C, *grid) -> (B, C, *grid)."""
    prep, bias = entry["fused"]
    grid = tuple(v.shape[2:])
    if output_shape is not None and tuple(output_shape) != grid:
        layer_pads(v, tuple(output_shape), grid)  # raises: a refined layer keeps its grid
    out = refined_layer(prep.symbol, prep.ops, v, entry["faces"], entry["v_faces"])
    entry["done"] = True
    return out if bias is None else out + bias


def forward_hook(
    ref: Refinement, module: torch.nn.Module, args: tuple, output: Tensor
) -> Tensor | None:
    """Forward hook: T1, the rows of every condition in order."""
    call = ref.context.current()
    if call is None or not call.rows:
        return None
    with _full_precision(output) as dtype:
        return _write_rows(ref, call, output.to(dtype))


def _write_rows(ref: Refinement, call: _Call, output: Tensor) -> Tensor | None:
    stack = call.pending.get(id(ref))
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
    layer_pads(v, tuple(output.shape[2:]), phys)
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
            ref._gap = parts
    # T1, in the order of the conditions. A layer described by `spectrum` (a spectral
    # convolution) returns a fresh tensor that nothing else holds: its rows are written in
    # place (autograd still checks the versions); any other layer's output is left alone.
    inplace = ref.spectrum is not None
    writes: list[tuple[int, Tensor, Tensor]] = []  # consecutive rows that pass values
    for kind, axis, sides in call.rows:
        a = 2 + axis
        if kind == "average":
            out = _write(out, inplace, writes)
            writes = []
            ends = [position(pads, phys, axis, s) for s in ("low", "high")]
            idx = _index(tuple(ends), out.device)
            rows = out.index_select(a, idx)
            rows = rows.mean(dim=a, keepdim=True).expand_as(rows)
            out = out.index_copy_(a, idx, rows) if inplace else out.index_copy(a, idx, rows)
            continue
        pos = tuple(position(pads, phys, axis, side) for side in sides)
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
