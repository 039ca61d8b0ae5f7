"""Adapter for neuraloperator models (FNO, TFNO, UNO, LocalNO, CODANO, ...).

Imported only when a neuraloperator model is wrapped. It serves every ``BaseModel`` subclass whose
output is a channel-first grid, and fixes neuraloperator's checkpoint trap: ``BaseModel.state_dict``
writes a ``_metadata`` entry (its init kwargs, which can hold functions such as ``F.gelu``) into the
destination without the wrapper's ``model.`` prefix; that key breaks a strict ``load_state_dict`` of
the wrapper and refuses ``torch.load(weights_only=True)``. The hooks below keep the wrapper's
checkpoint pure tensors, and accept a plain neuraloperator state dict (un-prefixed, with or
without ``_metadata``) in ``wrapper.load_state_dict``.

Checkpoints
-----------
A wrapped neuraloperator model offers what neuraloperator's tools call on a model (its
``Trainer`` with ``save_every`` / ``save_best`` / ``resume_from_dir``, and users):

- ``wrapped.save_checkpoint(folder, name)`` writes the model's own neuraloperator checkpoint,
  ``{name}_state_dict.pt`` (the model's state dict, pure tensors: ``torch.load`` reads it with
  ``weights_only=True``) and ``{name}_metadata.pkl`` (its init kwargs), so plain
  ``FNO.from_checkpoint(folder, name)`` loads it and nobody is locked in; plus the sidecar
  ``{name}_constraint_layers.pt`` that describes the wrapper (its layer class, constraints and
  options; written with ``torch.save``, a pickle: load only files you trust, as for
  neuraloperator's ``_metadata.pkl``).
- ``wrapped.load_checkpoint(folder, name)`` loads the weights into the wrapped model, in place;
  the wrapper keeps its own constraints.
- :func:`from_checkpoint` (also ``wrapped.from_checkpoint``) rebuilds the wrapper: the model by
  its class's ``from_checkpoint``, the constraints and options from the sidecar.

The normaliser (``normalizer=``) is the training pipeline's, not part of the wrapper's state:
pass it again to :func:`from_checkpoint`. Constraints that cannot be pickled (a lambda or a
local function as a value) are not saved: the sidecar then says so, and :func:`from_checkpoint`
asks for them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from types import MethodType
from typing import Any

import torch
from torch import nn

from constraint_layers.boundary.spectral import SpectralKernel
from constraint_layers.errors import GridError

from ._registry import register
from .base import Adapter

__all__ = ["SIDECAR_SUFFIX", "NeuralopAdapter", "from_checkpoint"]

_METADATA = "_metadata"
#: File name suffix of the sidecar that describes a wrapper: ``{name}_constraint_layers.pt``.
SIDECAR_SUFFIX = "_constraint_layers.pt"
_FORMAT = 1
_UNSET: Any = object()  # `normalizer=` not given (None means: no normaliser)
#: Init arguments of a layer that are not saved in the sidecar: the model has its own files, the
#: normaliser belongs to the training pipeline, and the adapter is saved on its own.
_NOT_OPTIONS = ("self", "model", "adapter", "normalizer")


def _drop_metadata_entries(model: nn.Module, state_dict: dict) -> None:
    # every neuraloperator model inside (a UQNO holds two FNOs) writes its init kwargs under the
    # bare key `_metadata`, whatever its prefix: drop exactly those objects
    kwargs = {id(m._init_kwargs) for m in model.modules() if hasattr(m, "_init_kwargs")}
    for key in [k for k, v in state_dict.items() if k.endswith(_METADATA) and id(v) in kwargs]:
        del state_dict[key]


def _drop_metadata(wrapper: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    _drop_metadata_entries(wrapper.model, state_dict)


def _accept_plain(
    wrapper: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list,
    unexpected_keys: list,
    error_msgs: list,
) -> None:
    for key in (_METADATA, prefix + _METADATA, prefix + "model." + _METADATA):
        state_dict.pop(key, None)
    ours = [k for k in state_dict if k.startswith(prefix)]
    if ours and not any(k.startswith(prefix + "model.") for k in ours):
        # a plain checkpoint of the model: its keys lack the wrapper's single prefix
        model_keys = set(wrapper.model.state_dict(keep_vars=True)) - {_METADATA}
        if {k[len(prefix) :] for k in ours} <= model_keys:
            for k in ours:
                state_dict[prefix + "model." + k[len(prefix) :]] = state_dict.pop(k)


def _spectral_convs(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "fno_blocks", None)
    convs = getattr(blocks, "convs", None)
    if convs is None:
        raise ValueError(
            f"mode='refine': {type(model).__name__} has no fno_blocks.convs; kernel refinement "
            "serves neuraloperator's FNO and TFNO (and models built on FNOBlocks). Use "
            "mode='output' for other models."
        )
    return list(convs)


def spectral_kernel(conv: nn.Module, grid: tuple[int, ...]) -> SpectralKernel:
    """The weights of a neuraloperator ``SpectralConv`` at the modes it keeps on ``grid``.

    Follows ``SpectralConv.forward`` (neuraloperator 2.0): ``rfftn`` of the input, the centred
    block of ``n_modes`` frequencies along every axis but the last (after ``fftshift``), the first
    ``n_modes[-1] // 2 + 1`` along the last, the weight sliced from ``max_n_modes`` around its
    centre, ``irfftn`` back, plus the bias. Dense and factorised (Tucker, CP, TT) weights are
    materialised with ``to_tensor()``, differentiably; a separable weight becomes its diagonal.
    """
    name = type(conv).__name__
    if getattr(conv, "complex_data", False):
        raise GridError(f"mode='refine': {name} with complex_data=True is not supported.")
    if getattr(conv, "resolution_scaling_factor", None) is not None:
        raise GridError(
            f"mode='refine': {name} with resolution_scaling_factor changes the grid; a refined "
            "layer must keep it."
        )
    n = len(grid)
    if conv.order != n:
        raise GridError(f"mode='refine': {name} acts on {conv.order} axes, the grid has {n}.")
    if n > 1 and any(m % 2 for m in grid[:-1]):
        raise GridError(
            f"mode='refine': {name} is not shift invariant on the grid {tuple(grid)}: with "
            "an odd size along an axis other than the last, neuraloperator 2.0 applies fftshift "
            "twice and moves every output frequency by one. Use even sizes there (the layer's "
            "grid, after domain padding)."
        )
    fft_size = [*grid[:-1], grid[-1] // 2 + 1]
    starts = [mx - min(size, nm) for size, nm, mx in zip(fft_size, conv.n_modes, conv.max_n_modes)]
    sl = [slice(s // 2, -s // 2) if s else slice(s, None) for s in starts[:-1]]
    sl.append(slice(None, -starts[-1]) if starts[-1] else slice(None))
    weight = conv.weight
    dense = weight if torch.is_tensor(weight) else weight.to_tensor()
    if conv.separable:  # (C, *modes): the diagonal of (C, C, *modes)
        dense = torch.diag_embed(dense.movedim(0, -1)).movedim(-2, 0).movedim(-1, 1)
    w = dense[(slice(None), slice(None), *sl)]
    freqs = []
    for d, (size, kept) in enumerate(zip(fft_size, w.shape[2:])):
        if d == n - 1:
            freqs.append(torch.arange(min(kept, size)))
        else:  # centred after fftshift: frequencies -kept//2 .. kept//2 + kept%2 - 1
            f = torch.arange(kept) - kept // 2
            freqs.append(f % size)
    freqs = tuple(f.to(w.device) for f in freqs)
    return SpectralKernel(w, freqs, tuple(grid), conv.bias, exact=_stock_forward(conv))


def _stock_forward(conv: nn.Module) -> bool:
    """Whether ``conv`` computes exactly ``irfftn(W . rfftn(x)) + bias``: neuraloperator's own
    ``SpectralConv.forward`` in full precision (a subclass that overrides ``forward``, or a
    half / mixed precision layer, runs its own forward on the refined input instead)."""
    from neuralop.layers.spectral_convolution import SpectralConv

    return (
        type(conv).forward is SpectralConv.forward
        and getattr(conv, "fno_block_precision", "full") == "full"
    )


@register("neuralop.models.base_model.BaseModel")
class NeuralopAdapter(Adapter):
    """neuraloperator models: called as ``model(x, ...)``, output ``(batch, channels, *grid)``.

    With ``mode="refine"`` (BOON's kernel refinement) a forward hook on every spectral convolution
    of ``model.fno_blocks`` refines the layer so that its boundary outputs depend only on its
    boundary inputs (see ``constraint_layers.boundary.refine``); the layer's boundary block and
    coupling come in closed form from its weights (``spectral_kernel``). A stock
    ``SpectralConv`` in full precision is evaluated in one pass from its weights (its
    ``forward`` replaced by the refinement's while wrapped; parameters and ``state_dict``
    unchanged). The hooks act only inside the wrapper's own calls, and
    :func:`constraint_layers.unwrap` removes them and restores the layer's ``forward``.
    """

    name = "neuraloperator"
    supports_refinement = True

    def attach(self, wrapper: nn.Module) -> None:
        wrapper.register_state_dict_post_hook(_drop_metadata)
        wrapper.register_load_state_dict_pre_hook(_accept_plain)
        if getattr(wrapper, "mode", "output") == "refine":
            for conv in _spectral_convs(wrapper.model):
                closed = hasattr(conv, "n_modes") and hasattr(conv, "max_n_modes")
                spectrum = functools.partial(spectral_kernel, conv) if closed else None
                wrapper.add_refinement(conv, spectrum=spectrum)

    def wrapper_attribute(self, wrapper: nn.Module, name: str) -> Any:
        """``save_checkpoint`` / ``load_checkpoint`` (bound to the wrapper) and
        ``from_checkpoint``: what neuraloperator's ``Trainer`` and users call on a model."""
        if name in _WRAPPER_METHODS:
            return MethodType(_WRAPPER_METHODS[name], wrapper)
        if name == "from_checkpoint":
            return from_checkpoint
        return super().wrapper_attribute(wrapper, name)


# ------------------------------------------------------------------------------- checkpoints
def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(path: str) -> type | None:
    module, _, qualname = path.partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) else None


def _describe(wrapper: nn.Module) -> dict[str, Any]:
    """The sidecar record of a wrapper: its layer class, constraints and init options.

    A layer's init arguments are read back from the attributes of the same name (the layers
    store each one under its own name); the first argument after the model holds the
    constraints. Whatever cannot be described is recorded as ``reason``.
    """
    layer = type(wrapper)
    params = [
        p
        for p in inspect.signature(layer.__init__).parameters.values()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    names = [p.name for p in params if p.name not in _NOT_OPTIONS]
    values = {n: getattr(wrapper, n, _UNSET) for n in names}
    missing = [n for n, v in values.items() if v is _UNSET]
    constraints = values.pop(names[0]) if names else _UNSET
    normalizer = getattr(wrapper, "normalizer", None)
    record: dict[str, Any] = {
        "format": _FORMAT,
        "layer": _class_path(layer),
        "model": _class_path(type(wrapper.model)),
        "adapter": wrapper.adapter,
        "normalizer": None if normalizer is None else type(normalizer).__name__,
        "constraints": None,
        "options": None,
        "description": f"{layer.__name__}({wrapper.extra_repr()})",
        "reason": None,
    }
    if not _picklable(wrapper.adapter):
        record["adapter"] = None  # the registry finds the adapter again on reload
    if missing or constraints is _UNSET:
        record["reason"] = (
            f"{layer.__name__} keeps no attribute for its init argument(s) {missing}, so the "
            "wrapper cannot be described"
        )
        return record
    if not _picklable(values):
        record["reason"] = f"the layer options {values} cannot be pickled"
        return record
    record["options"] = values
    if _picklable(list(constraints)):
        record["constraints"] = list(constraints)
    else:
        record["reason"] = (
            f"the constraints {list(constraints)} cannot be pickled (a lambda or a local function "
            "as a value?)"
        )
    return record


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True


def save_checkpoint(wrapper: nn.Module, save_folder: str | Path, save_name: str) -> None:
    """Save a wrapped neuraloperator model: the model's own checkpoint plus the wrapper's sidecar.

    Called as ``wrapped.save_checkpoint(save_folder, save_name)`` (neuraloperator's ``Trainer``
    does so with ``save_every`` / ``save_best``). Writes, in ``save_folder`` (created if needed):

    - ``{save_name}_state_dict.pt``: the model's state dict (pure tensors, without
      neuraloperator's ``_metadata`` entry, so ``torch.load(..., weights_only=True)`` reads it);
    - ``{save_name}_metadata.pkl``: the model's init kwargs, as neuraloperator writes them;
    - ``{save_name}_constraint_layers.pt``: the wrapper's layer class, constraints and options.

    The first two are a plain neuraloperator checkpoint: ``FNO.from_checkpoint(save_folder,
    save_name)`` loads the bare model. The normaliser is not saved (it is the training
    pipeline's); constraints that cannot be pickled (lambda values) are left out of the sidecar
    with a warning.

    Parameters
    ----------
    wrapper : nn.Module
        A constraint layer around a neuraloperator model.
    save_folder : str or Path
        The folder to write to.
    save_name : str
        The prefix of the file names.
    """
    model = wrapper.model
    folder = Path(save_folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    _drop_metadata_entries(model, state)
    torch.save(state, folder / f"{save_name}_state_dict.pt")
    torch.save(model._init_kwargs, folder / f"{save_name}_metadata.pkl")
    record = _describe(wrapper)
    torch.save(record, folder / f"{save_name}{SIDECAR_SUFFIX}")
    if record["reason"] is not None:
        warnings.warn(
            f"save_checkpoint: saved the model's weights, but not the wrapper: {record['reason']}. "
            f"To reload, pass the constraints again: constraint_layers.adapters.neuralop."
            f"from_checkpoint(folder, {save_name!r}, *constraints, ...). Saved wrapper: "
            f"{record['description']}.",
            UserWarning,
            stacklevel=2,
        )


def load_checkpoint(
    wrapper: nn.Module, save_folder: str | Path, save_name: str, map_location: Any = None
) -> None:
    """Load the model weights of a checkpoint into the wrapped model, in place.

    Called as ``wrapped.load_checkpoint(save_folder, save_name)``. Reads
    ``{save_name}_state_dict.pt`` (written by the wrapper's ``save_checkpoint`` or by the plain
    model's); the wrapper keeps its own constraints and options (to rebuild those from the
    checkpoint, use :func:`from_checkpoint`).
    """
    wrapper.model.load_checkpoint(save_folder, save_name, map_location=map_location)


def from_checkpoint(
    save_folder: str | Path,
    save_name: str,
    *constraints: Any,
    normalizer: object = _UNSET,
    map_location: Any = None,
    **options: Any,
) -> nn.Module:
    """Rebuild a wrapped neuraloperator model from a checkpoint its ``save_checkpoint`` wrote.

    The model is rebuilt by its class's own ``from_checkpoint``; the wrapper from the sidecar
    ``{save_name}_constraint_layers.pt`` (same layer class, constraints, options and adapter).
    The sidecar is a pickle (``torch.load(weights_only=False)``): load only checkpoints you trust.

    Parameters
    ----------
    save_folder : str or Path
        The folder holding the checkpoint.
    save_name : str
        The prefix of its file names (the ``Trainer`` uses ``"model"`` or ``"best_model"``).
    *constraints
        Constraints to use instead of the saved ones (the saved layer and options are kept);
        required when the sidecar holds none (they could not be pickled, or the checkpoint is a
        plain neuraloperator one).
    normalizer : object, optional
        The training pipeline's output normaliser (e.g. the ``DefaultDataProcessor``). Required
        when the wrapper was saved with one (pass ``None`` to drop it deliberately).
    map_location : optional
        As for ``torch.load``.
    **options
        Layer options that replace the saved ones (e.g. ``debug=True``).

    Returns
    -------
    nn.Module
        The rebuilt wrapper; ``wrapper.model`` is the model loaded by its ``from_checkpoint``.

    Raises
    ------
    FileNotFoundError
        The folder holds no model checkpoint named ``save_name``.
    ValueError
        The constraints or the normaliser are needed and were not given.

    Examples
    --------
    >>> import tempfile, torch, constraint_layers as cl
    >>> from neuralop.models import FNO
    >>> from constraint_layers.adapters.neuralop import from_checkpoint
    >>> fno = FNO(n_modes=(4,), in_channels=1, out_channels=1, hidden_channels=4)
    >>> wrapped = cl.wrap(fno, cl.Dirichlet(0.0))
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     wrapped.save_checkpoint(folder, "fno")
    ...     again = from_checkpoint(folder, "fno")
    >>> list(again.bcs)
    [Dirichlet(0.0, dim=0, side='both')]
    >>> x = torch.randn(2, 1, 16)
    >>> torch.equal(again(x), wrapped(x))
    True
    """
    call = "from_checkpoint"
    folder = Path(save_folder)
    weights = folder / f"{save_name}_state_dict.pt"
    metadata = folder / f"{save_name}_metadata.pkl"
    if not (weights.exists() and metadata.exists()):
        raise FileNotFoundError(
            f"{call}: expected a checkpoint named {save_name!r} in {str(folder)!r} (files "
            f"{weights.name} and {metadata.name}, as save_checkpoint writes them); found "
            f"{sorted(p.name for p in folder.glob('*'))[:8] if folder.is_dir() else 'no folder'}."
        )
    sidecar = folder / f"{save_name}{SIDECAR_SUFFIX}"
    record = torch.load(sidecar, weights_only=False) if sidecar.exists() else None
    if record is not None and record.get("format", 0) > _FORMAT:
        raise ValueError(
            f"{call}: {sidecar.name} has format {record['format']}, newer than this version of "
            f"constraint-layers reads ({_FORMAT}); upgrade constraint-layers."
        )
    model_cls = _import_class(record["model"]) if record is not None else None
    if model_cls is None:
        from neuralop.models.base_model import BaseModel

        kwargs = torch.load(metadata, weights_only=False)
        model_cls = BaseModel._models.get(str(kwargs.get("_name", "")).lower())
        if model_cls is None:
            raise ValueError(
                f"{call}: cannot tell the model class of {metadata.name} (neuraloperator name "
                f"{kwargs.get('_name')!r}); load it with YourModel.from_checkpoint and wrap it."
            )
    if not constraints:
        if record is None or record["constraints"] is None:
            why = (
                f"{sidecar.name} is missing (a plain neuraloperator checkpoint?)"
                if record is None
                else f"the checkpoint holds no constraints: {record['reason']} (saved wrapper: "
                f"{record['description']})"
            )
            raise ValueError(
                f"{call}: expected the constraints, as the checkpoint cannot supply them: {why}. "
                f"Pass them (and any layer options): from_checkpoint(folder, {save_name!r}, "
                f"cl.Dirichlet(...), ...), or "
                f"wrap the model yourself: cl.wrap({model_cls.__name__}.from_checkpoint(folder, "
                f"{save_name!r}), *constraints)."
            )
        constraints = tuple(record["constraints"])
    saved_options = dict(record["options"] or {}) if record is not None else {}
    if normalizer is _UNSET:
        if record is not None and record["normalizer"] is not None:
            raise ValueError(
                f"{call}: the wrapper was saved with normalizer= a {record['normalizer']}, which "
                "is the training pipeline's and not part of the checkpoint. Pass it again: "
                f"from_checkpoint(folder, {save_name!r}, normalizer=data_processor) (or "
                "normalizer=None to drop it; the outputs are then in normalised units)."
            )
        normalizer = None
    model = model_cls.from_checkpoint(folder, save_name, map_location=map_location)
    options = {**saved_options, **options, "normalizer": normalizer}
    if record is not None and record.get("adapter") is not None:
        options.setdefault("adapter", record["adapter"])
    layer = _import_class(record["layer"]) if record is not None else None
    if layer is not None:
        return layer(model, list(constraints), **options)
    from .wrap import wrap

    return wrap(model, *constraints, **options)


_WRAPPER_METHODS: dict[str, Callable[..., Any]] = {
    "save_checkpoint": save_checkpoint,
    "load_checkpoint": load_checkpoint,
}
