"""The layer's options and checks (private): arguments, the model's output, the debug check.

One policy for every family. Always, at every call (under ``torch.compile`` too, at the cost of
a graph break): values given per call (callables, ``cl.Given``, tensors that require grad) are
finite and fit the output dtype; the model's output (mean, variance, the diagonal of a dense
covariance) is finite and variances are non-negative: a NaN or inf the model produced raises
(naming the model's output), it is never passed on; a normaliser's scale is finite and non-zero;
the result is finite when the output was (else the projection overflowed the output dtype, and
the error says so). Values given at construction are checked once, at construction (finite), and
again when a tensor value is cast to a narrower output dtype (overflow). Only with
``debug=True``: every row's residual after the projection, against the tolerance table of
``constraint_layers._tolerance`` (a NaN residual fails too), and every value within the bounds
(``cl.Bounds``, exactly). The functional API (``project``, ``enforce_boundary``,
``enforce_conservation``, ``condition_gaussian``) checks its inputs the same way.

Every family treats rows alike: rows that follow from the others with the same value are
accepted (dropped), rows that follow with another value raise
:class:`~constraint_layers.errors.IncompatibleConstraintsError`; two boundary conditions on one
face (and channel) raise. An empty batch comes back as it is; a grid too short for a row raises.
Complex outputs take boundary conditions (real or complex values, kept whole); conservation
constraints act on real outputs and raise a ``TypeError`` for complex ones (constrain the real
and imaginary parts as two channels). Messages name the user's call: errors raised by the
engine's building blocks (``condition_gaussian``, ``Conservation.rows``, ...) are reported under
the wrapper's name.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._engine.faces import boundary_residuals
from ._engine.rowops import split_families
from ._engine.streaming import grid_view
from ._grid import resolve_spacing
from ._tolerance import tolerance
from ._values import check_finite_now
from .bounds import resolve_bounds
from .conservation.gaussian import Gaussian
from .errors import ConstraintViolationError, GridError
from .pointcloud.solve import check_point_constraints, check_point_residual, point_residual
from .rows import FAMILIES

__all__ = [
    "LAYOUTS",
    "NO_TRACE",
    "check_bounds",
    "check_constraints",
    "check_grid_shape",
    "check_model_attribute",
    "check_noise",
    "check_prediction",
    "check_rows",
    "options_repr",
    "refuse_lossy_cast",
    "residual_rows",
    "resolve_layout",
]

LAYOUTS = ("auto", "grid", "points")


def resolve_layout(layout: Any, adapter: Any, model: nn.Module, constraints: Any, call: str) -> str:
    """``"grid"`` or ``"points"``: as given, else the adapter's word for the model, else points
    when a constraint is stated on points. On points, grid-only constraints raise here."""
    if layout not in LAYOUTS:
        raise ValueError(f"{call}: layout must be one of {LAYOUTS}, got {layout!r}.")
    if layout == "auto":
        told = getattr(adapter, "layout", None)
        told = told(model) if callable(told) else "grid"
        if told == "points" or any(c.family == "points" for c in constraints):
            layout = "points"
        else:
            layout = "grid"
    if layout == "points":
        check_point_constraints(constraints, call)
    else:
        stated = [c for c in constraints if c.family == "points"]
        if stated:
            raise GridError(
                f"{call}: {stated[0]!r} is stated on the points of a point cloud, but the output "
                "is read as a grid (layout='grid'). Drop layout='grid' (a point constraint makes "
                "the output a point cloud (batch, n_points, channels)), or state the constraint "
                "on the grid's faces (cl.Dirichlet(value, dim=..., side=...))."
            )
    return layout


def check_constraints(items: Any, call: str) -> tuple[Any, ...]:
    if isinstance(items, (list, tuple)):
        items = tuple(items)
    else:
        items = (items,)
    for c in items:
        if getattr(type(c), "family", None) not in FAMILIES:
            raise TypeError(
                f"{call}: expected constraints (cl.Dirichlet, cl.Neumann, cl.Periodic, "
                "cl.Conservation, cl.Conservation.integral, cl.Bounds, cl.DivergenceFree, "
                f"cl.LinearPDE, cl.Continuity, cl.NormalComponent), got {type(c).__name__}."
            )
    if not items:
        raise ValueError(
            f"{call}: expected at least one constraint, e.g. cl.Dirichlet(0.0); got none."
        )
    return items


def residual_rows(layer: Any, g: Gaussian, inputs: Any, constraints: Sequence[Any]) -> Tensor:
    """Signed residual of every row on a prediction in physical units (see
    :meth:`ConstraintLayer.residual <constraint_layers.layer.ConstraintLayer.residual>`)."""
    call = type(layer).__name__
    if layer.layout == "points":
        return point_residual(g.mean, g.event_ndim, constraints, inputs, call)
    shape = grid_view(g.mean, g.event_ndim, layer.grid_shape, call)
    y = g.mean.reshape(shape)
    bnd, con = split_families(constraints)
    parts = []
    if bnd:
        res = boundary_residuals(
            y, bnd, spacing=layer.spacing, extent=layer.extent, endpoint=layer.endpoint,
            inputs=inputs, include_overridden=False,
        )  # fmt: skip
        for sides in res:
            for r in sides:
                parts.append(r.reshape(shape[0], -1).to(torch.float64))
    for c in con:
        parts.append(c.residual(y, inputs=inputs))
    for c in constraints:  # local rows (structure tag "local"): one per node
        if getattr(c, "structure", None) == "local":
            parts.append(c.rows(shape, grid=layer.grid, inputs=inputs).residual(y))
    return torch.cat(parts, dim=-1)


def check_rows(layer: Any, post: Gaussian, inputs: Any, constraints: Sequence[Any]) -> None:
    """The debug check: every row's residual against the residual tolerance."""
    call = type(layer).__name__
    if layer.layout == "points":
        check_point_residual(post.mean.detach(), post.event_ndim, constraints, inputs, call)
        bounds = [c for c in constraints if c.family == "bounds"]
        if bounds:
            check_bounds(post.mean.detach(), bounds, inputs, tuple(post.mean.shape), call)
        return
    shape = grid_view(post.mean, post.event_ndim, layer.grid_shape, call)
    y = post.mean.detach().reshape(shape)
    tol = tolerance(y.dtype).residual
    scale = float(y.abs().max()) + 1.0 if y.numel() else 1.0
    bnd, con = split_families(constraints)
    worst: list[tuple[float, Any]] = []
    if bnd:
        res = boundary_residuals(
            y, bnd, spacing=layer.spacing, extent=layer.extent, endpoint=layer.endpoint,
            inputs=inputs, include_overridden=False,
        )  # fmt: skip
        hs = resolve_spacing(y.shape[2:], spacing=layer.spacing, extent=layer.extent,
                             endpoint=layer.endpoint)  # fmt: skip
        for bc, sides in zip(bnd, res):
            h = hs[bc.axis(len(hs), call)] if bc.derivative else 1.0
            size = max((float(r.abs().max()) if r.numel() else 0.0) for r in sides)
            worst.append((size * h / (scale * _value_scale(bc, h)), bc))
    for c in con:
        r = c.residual(y, inputs=inputs)
        size = float(r.abs().max()) if r.numel() else 0.0
        worst.append((size / (scale * _row_scale(c, y)), c))
    for c in constraints:  # local rows: relative to the terms each row balances
        if getattr(c, "structure", None) == "local":
            rows = c.rows(shape, grid=layer.grid, inputs=inputs)
            worst.append((float(rows.relative_residual(y).max()), c))
    for rel, c in worst:
        if not rel <= tol:  # NaN fails too
            raise ConstraintViolationError(
                f"{call}(debug=True): {c!r} has relative residual {rel:.3e} after the "
                f"projection (tolerance {tol:.1e} for {y.dtype}). This is a bug: please "
                "report it with the constraints and the output shape."
            )
    bounds = [c for c in constraints if c.family == "bounds"]
    if bounds:
        check_bounds(y, bounds, inputs, tuple(post.mean.shape), call)


def refuse_lossy_cast(wrapper: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
    """Raise before ``fn`` (a ``Module._apply`` function) turns a complex tensor of the model
    into a real one: torch's ``.to(torch.float64)`` does so with a UserWarning, discarding the
    imaginary parts (neuraloperator's spectral weights), so the model is lost. ``fn`` is tried
    on a one-element tensor of each complex dtype the wrapper holds; nothing is cast first."""
    seen: dict[tuple[torch.dtype, torch.device], str] = {}
    for name, t in [*wrapper.named_parameters(), *wrapper.named_buffers()]:
        if t.is_complex():
            seen.setdefault((t.dtype, t.device), name)
    for (dtype, device), name in seen.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's "discards the imaginary part"
                probe = fn(torch.zeros(1, dtype=dtype, device=device))
        except Exception:  # a function meant for other tensors: torch's own _apply decides
            continue
        if isinstance(probe, Tensor) and not probe.is_complex():
            call = type(wrapper).__name__
            raise TypeError(
                f"{call}.to({probe.dtype}): the wrapped model holds complex tensors (e.g. "
                f"{name!r}, {dtype}) that this cast would make real, discarding their imaginary "
                "parts (torch only warns; the model would be another one). Refused; nothing was "
                "cast. To change the precision of the real tensors and keep the complex ones, "
                "use .double() / .float() (for a neuraloperator FNO in float64, also cast its "
                "complex weights: p.data = p.data.to(torch.complex128) for each complex "
                "parameter); to move it, .to(device) alone."
            )


def check_bounds(
    y: Tensor, bounds: Sequence[Any], inputs: Any, flat_shape: tuple[int, ...], call: str
) -> None:
    """The debug check of the bounds: every value within them, exactly (no tolerance: the
    projection puts active values on their bound and clips the rest)."""
    lo, hi = resolve_bounds(
        bounds, y.shape, dtype=y.dtype, device=y.device, inputs=inputs, flat_shape=flat_shape,
        call=call,
    )  # fmt: skip
    for side, lim, outside in (
        ("lower", lo, None if lo is None else ~(y >= lo)),  # NaN is outside too
        ("upper", hi, None if hi is None else ~(y <= hi)),
    ):
        if outside is not None and bool(outside.any()):
            idx = tuple(int(i) for i in outside.nonzero()[0])
            raise ConstraintViolationError(
                f"{call}(debug=True): the value {float(y[idx])!r} at index {idx} of the output "
                f"{tuple(y.shape)} (batch, channel, d1, ...) is outside its {side} bound "
                f"{float(lim.expand(y.shape)[idx])!r} after the projection ({int(outside.sum())} "
                f"value(s) in all; bounds {list(bounds)}). This is a bug: please report it with "
                "the constraints and the output shape."
            )


def _value_scale(bc: Any, h: float) -> float:
    v = bc.value
    return 1.0 + (abs(v) * h if isinstance(v, float) else 0.0)


def _row_scale(c: Any, y: Tensor) -> float:
    """The size of the terms a conservation row balances, relative to ``max |u|``: its total
    weight (an integral over an extent L weighs L)."""
    rows = c.rows(y.shape)
    return max(1.0, float(rows.coeff.abs().sum(-1).max()))


def check_noise(noise: Any, constraints: Sequence[Any], call: str) -> Any:
    n = len(constraints)
    if isinstance(noise, (list, tuple)):
        if len(noise) != n:
            raise ValueError(
                f"{call}: noise given per constraint must have one value per constraint ({n}), "
                f"got {len(noise)}."
            )
        for v in noise:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{call}: noise values must be numbers >= 0, got {v!r}.")
        for c, v in zip(constraints, noise):
            if v != 0 and c.family != "conservation":
                fix = [
                    0.0 if d.family != "conservation" else float(w)
                    for d, w in zip(constraints, noise)
                ]
                raise ValueError(
                    f"{call}: noise={list(noise)} gives {c!r} the noise {v}, but noise softens "
                    "conservation rows only: boundary conditions and bounds stay exact. Give 0.0 "
                    f"for them (noise={fix})."
                )
        return tuple(float(v) for v in noise)
    if isinstance(noise, bool) or not isinstance(noise, (int, float, Tensor)):
        raise TypeError(f"{call}: noise must be a number, a tensor or a sequence, got {noise!r}.")
    if not isinstance(noise, Tensor) and not float(noise) >= 0:
        raise ValueError(f"{call}: noise must be non-negative, got {noise}.")
    return noise


def check_grid_shape(grid_shape: Any, call: str) -> tuple[int, ...]:
    """``grid_shape`` as a tuple of ints (numpy and 0-d tensor integers accepted)."""
    try:
        if isinstance(grid_shape, (str, bytes)) or any(isinstance(s, bool) for s in grid_shape):
            raise TypeError
        return tuple(operator.index(s) for s in grid_shape)
    except TypeError:
        raise TypeError(
            f"{call}: grid_shape must be a sequence of ints (the grid (d1, ..., dn) of a flat "
            f"output), got {grid_shape!r}."
        ) from None


def check_prediction(pred: Gaussian, call: str) -> None:
    if pred.mean.is_meta:
        raise ValueError(
            f"{call}: the model's output is a meta tensor (device='meta': shapes without "
            "values), and the constraints need values. Run the wrapper on a real device (e.g. "
            "model.to_empty(device='cpu'), then load the weights); to infer output shapes, call "
            "the unwrapped model: constraint_layers.unwrap(wrapper)(x)."
        )
    check_finite_now(pred.mean, call, "model's output (mean)")
    if pred.variance is not None:
        check_finite_now(pred.variance, call, "model's output variance")
        if not bool((pred.variance.detach() >= 0).all()):
            raise ValueError(
                f"{call}: the model's output variance holds negative values "
                f"(min {float(pred.variance.detach().min()):.3e}); expected variances >= 0. A "
                "2-tuple output is read as (mean, variance): if its second item is another "
                "output (the model returns (x, aux)), return a dict with the prediction under "
                "'mean' instead ({'mean': x, 'aux': aux}: the other entries pass through "
                "unchanged), or register an adapter whose read() picks the prediction "
                "(constraint_layers.adapters.register)."
            )


# ------------------------------------------------------------------------ the layer's options
_MODES = ("output", "refine")

NO_TRACE = (
    "{call}: a constraint layer cannot be traced with torch.jit.trace: its rows depend on the "
    "output's grid (boundary positions, spacing, quadrature weights), which a trace freezes as "
    "constants, so the traced module would be wrong at any other resolution. Use "
    "torch.compile(wrapper) instead (exact at every resolution), or call the wrapper untraced."
)


def check_adapter(adapter: Any, model: nn.Module, call: str) -> Any:
    """The adapter given, else the registry's for ``model``; it must be an Adapter."""
    if adapter is None:
        from .adapters import find  # the registry: model-agnostic, imports no model library

        adapter = find(model)
    if not all(hasattr(adapter, a) for a in ("read", "write", "constrain", "attach")):
        raise TypeError(
            f"{call}: adapter must be a constraint_layers.adapters.Adapter (an instance of a "
            f"subclass), got {type(adapter).__name__}."
        )
    return adapter


def check_refine_options(
    mode: Any, rcond: Any, refresh: Any, kernel_grad: Any, layout: str, model: Any, call: str
) -> tuple[str, float, int, str]:
    """``(mode, rcond, refresh, kernel_grad)`` checked (see :class:`BoundaryCorrection`)."""
    from .boundary.refine import KERNEL_GRADS

    if mode not in _MODES:
        raise ValueError(f"{call}: mode must be one of {_MODES}, got {mode!r}.")
    if mode == "refine" and layout == "points":
        raise GridError(
            f"{call}: mode='refine' refines the Fourier layers of a model for a grid's "
            f"boundary conditions; {type(model).__name__}'s output is a point cloud, which "
            "has no faces to refine for. Use mode='output' with point constraints "
            "(cl.Dirichlet(points=), cl.NormalComponent, cl.Conservation.integral(weights=))."
        )
    if not (isinstance(rcond, float | int) and not isinstance(rcond, bool) and 0 <= rcond < 1):
        raise ValueError(f"{call}: rcond must be a number in [0, 1), got {rcond!r}.")
    if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
        raise ValueError(f"{call}: refresh must be a positive int, got {refresh!r}.")
    if kernel_grad not in KERNEL_GRADS:
        raise ValueError(f"{call}: kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}.")
    return mode, float(rcond), refresh, kernel_grad


def check_metric(metric: Any, call: str) -> str:
    from ._engine.streaming import METRICS

    if metric not in METRICS:
        raise ValueError(f"{call}: metric must be one of {METRICS}, got {metric!r}.")
    return metric


def check_flat_grid(grid_shape: Any, call: str) -> tuple[int, ...] | None:
    """``grid_shape`` (the grid of a flat output) as positive ints, or None."""
    if grid_shape is None:
        return None
    grid_shape = check_grid_shape(grid_shape, call)
    if not grid_shape or min(grid_shape) < 1:
        raise ValueError(f"{call}: grid_shape must hold positive sizes, got {grid_shape}.")
    return grid_shape


def check_refinable(layer: Any, call: str) -> None:
    """``mode="refine"`` needs boundary conditions and an adapter that can refine."""
    if not layer.bcs:
        raise ValueError(
            f"{call}: mode='refine' refines the model for boundary conditions; none were given."
        )
    if not getattr(layer.adapter, "supports_refinement", False):
        raise ValueError(
            f"{call}: mode='refine' needs an adapter that can refine the model's layers "
            f"(neuraloperator FNO / TFNO); {layer.adapter!r} serving "
            f"{type(layer.model).__name__} cannot. Use mode='output' (exact all the same)."
        )


def check_model_attribute(layer: Any, name: str) -> None:
    """Raise when ``layer.name = ...`` is meant for the wrapped model."""
    # after construction, a public name the wrapper lacks but the model has is meant for the
    # model (`wrapper.n_modes = ...`): set on the wrapper it would change nothing
    d = layer.__dict__
    if (
        "_context" in d
        and not name.startswith("_")
        and name not in d
        and not hasattr(type(layer), name)
        and name not in d.get("_parameters", {})
        and name not in d.get("_buffers", {})
        and name not in d.get("_modules", {})
    ):
        model = d.get("_modules", {}).get("model")
        if model is not None and hasattr(model, name):
            raise AttributeError(
                f"{type(layer).__name__}: {name!r} is an attribute of the wrapped model "
                f"({type(model).__name__}), not of the wrapper: set on the wrapper it would "
                f"change nothing. Set it on the model: wrapped.model.{name} = ..."
            )


def options_repr(layer: Any) -> str:
    """The wrapper's ``extra_repr``: its constraints and the options that differ from the
    defaults."""
    opts = [f"constraints={list(layer.constraints)}"]
    if layer.layout == "points":
        opts.append("layout='points'")
    if layer.bcs:
        opts.append(f"mode={layer.mode!r}")
    if layer.lift:
        opts.append(f"lift={layer.lift}")
    if layer.conservation:
        opts.append(f"metric={layer.metric!r}")
        if not (isinstance(layer.noise, (int, float)) and layer.noise == 0):
            opts.append(f"noise={layer.noise}")
    if layer.grid_shape is not None:
        opts.append(f"grid_shape={layer.grid_shape}")
    return ", ".join(opts)
