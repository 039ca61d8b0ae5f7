"""The one constraint layer: any mix of constraint families, one call path.

A wrapper holds the model under the single name ``model`` (its ``state_dict`` is the model's under
the prefix ``model.``; ``unwrap`` returns the very object). Each call runs the same path:

    read the output through the adapter -> bind ``cl.Given`` values -> un-normalise ->
    project (the engine, :mod:`constraint_layers._engine.dispatch`) -> re-normalise -> write back
    (-> optional debug check)

:class:`BoundaryCorrection` and :class:`ConservationProjection` are presets of it that accept one
family each, with the signatures of the first release.

Checks (one policy for every family)
------------------------------------
Always, at every call (under ``torch.compile`` too, at the cost of a graph break): values given
per call (callables, ``cl.Given``, tensors that require grad) are finite and fit the output dtype;
the model's output (mean, variance, the diagonal of a dense covariance) is finite and variances
are non-negative: a NaN or inf the model produced raises (naming the model's output), it is never
passed on; a normaliser's scale is finite and non-zero; the result is finite when the output was
(else the projection overflowed the output dtype, and the error says so). Values given at
construction are checked once, at construction (finite), and again when a tensor value is cast
to a narrower output dtype (overflow). Only with ``debug=True``: every row's residual after the
projection, against the tolerance table of ``constraint_layers._tolerance`` (a NaN residual
fails too), and every value within the bounds (``cl.Bounds``, exactly). The functional API
(``enforce_boundary``, ``enforce_conservation``, ``conserve``)
checks its inputs the same way.

Every family treats rows alike: rows that follow from the others with the same value are
accepted (dropped), rows that follow with another value raise
:class:`~constraint_layers.errors.IncompatibleConstraintsError`; two boundary conditions on one
face (and channel) raise. An empty batch comes back as it is; a grid too short for a row raises.
Complex outputs take boundary conditions (real or complex values, kept whole); conservation
constraints act on real outputs and raise a ``TypeError`` for complex ones (constrain the real
and imaginary parts as two channels). Messages name the user's call: errors raised by the
engine's building blocks (``conserve``, ``Conservation.rows``, ...) are reported under the
wrapper's name.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._bind_grid import bind_grid
from ._engine.dense import split_families
from ._engine.dispatch import project as _engine_project
from ._engine.streaming import METRICS, flat_event, grid_view
from ._grid import check_grid_options, resolve_spacing
from ._messages import under_call
from ._tolerance import tolerance
from ._values import bind_given, check_finite_now, given_names
from .boundary.enforce import boundary_residuals, check_lift
from .boundary.enforce import conditions as boundary_conditions
from .boundary.refine import KERNEL_GRADS, Refinement, RefinementContext
from .bounds import resolve_bounds
from .conservation.constraint import constraints_of
from .conservation.gaussian import Gaussian
from .errors import ConstraintViolationError, GridError
from .pointcloud.solve import (
    check_point_constraints,
    check_point_residual,
    point_residual,
)
from .rows import FAMILIES, GridSpec

__all__ = [
    "BoundaryCorrection",
    "ConservationProjection",
    "ConstraintLayer",
    "check_normalizer",
    "current_normalizer",
]

_MODES = ("output", "refine")

_NO_TRACE = (
    "{call}: a constraint layer cannot be traced with torch.jit.trace: its rows depend on the "
    "output's grid (boundary positions, spacing, quadrature weights), which a trace freezes as "
    "constants, so the traced module would be wrong at any other resolution. Use "
    "torch.compile(wrapper) instead (exact at every resolution), or call the wrapper untraced."
)


_LAYOUTS = ("auto", "grid", "points")


def _resolve_layout(
    layout: Any, adapter: Any, model: nn.Module, constraints: Any, call: str
) -> str:
    """``"grid"`` or ``"points"``: as given, else the adapter's word for the model, else points
    when a constraint is stated on points. On points, grid-only constraints raise here."""
    if layout not in _LAYOUTS:
        raise ValueError(f"{call}: layout must be one of {_LAYOUTS}, got {layout!r}.")
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


def _check_constraints(items: Any, call: str) -> tuple[Any, ...]:
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


class ConstraintLayer(nn.Module):
    """Wrap a model so that its outputs satisfy constraints of any family exactly.

    ``forward`` is the model call followed by one projection of its output through the model's
    adapter: boundary conditions by the face-local step, conservation by conditioning (Gaussian
    outputs: ProbConserv) or the Euclidean projection (deterministic outputs: HardC); both at once
    jointly, every row exact (see the README's "Boundary and conservation together"). The output
    comes back as the same kind of object the model returns.

    Parameters
    ----------
    model : nn.Module
        The model; held as ``self.model``, not copied.
    constraints : constraint or sequence of constraints
        Boundary conditions (applied in order: where two meet the later one holds) and
        conservation constraints (stacked), in any mix.
    spacing, extent, endpoint, lift
        Grid description and smoothing for boundary conditions, as for
        :func:`~constraint_layers.functional.enforce_boundary`.
    mode : {"output", "refine"}
        ``"refine"``: also refine every Fourier layer of the model (BOON's kernel correction);
        needs an adapter that supports it (neuraloperator FNO / TFNO).
    rcond, refresh, kernel_grad
        ``mode="refine"``: see :class:`BoundaryCorrection`.
    noise : float, Tensor or sequence, default 0.0
        Constraint noise standard deviation of the conservation rows (0: exact); a sequence gives
        one value per constraint in the order given (boundary conditions included: they stay
        exact, so their value must be 0; a non-zero one raises).
    metric : {"covariance", "euclidean"}, default "covariance"
        For Gaussian outputs: condition with the model's covariance (ProbConserv) or move the
        mean by the Euclidean projection (HardC). Deterministic outputs are always Euclidean.
    grid_shape : sequence of int, optional
        For flat outputs (a GP on grid points flattened in C order): the grid ``(d1, ..., dn)``.
    normalizer : object, optional
        The output normaliser of the training pipeline (``transform`` / ``inverse_transform``), or
        an object holding it as ``out_normalizer`` (neuraloperator's ``DefaultDataProcessor``).
        Constraints are stated and enforced in physical units. Held, not owned: it adds no keys
        to the wrapper's ``state_dict`` and is not moved by ``.to()``.
    adapter : Adapter, optional
        How to call the model and read its output; default: looked up in the registry.
    layout : {"auto", "grid", "points"}, default "auto"
        How the output is laid out: a grid ``(batch, channels, d1, ..., dn)``, or a point cloud
        ``(batch, n_points, channels)`` (channel-last; ``(batch, n_points)`` for one channel) at
        scattered points. ``"auto"``: what the adapter says for the model (neuraloperator's GINO
        and FNOGNO predict point clouds), else a point cloud when a constraint is stated on points
        (``cl.Dirichlet(points=)``, ``cl.NormalComponent``, ``cl.Conservation.integral(weights=)``).
    debug : bool, default False
        Check every row's residual after each call, and every value against the bounds
        (exactly); raise :class:`~constraint_layers.errors.ConstraintViolationError` beyond
        rounding (outside a bound at all).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> net = torch.nn.Conv1d(1, 1, 5, padding=2).double()
    >>> heat = cl.Conservation.integral(1.0)                  # the total heat is 1
    >>> model = cl.wrap(net, cl.Neumann(0.0), heat)           # and the walls are insulated
    >>> y = model(torch.randn(4, 1, 65, dtype=torch.float64))
    >>> bool(cl.metrics.boundary_error(y, model.bcs).max() < 1e-9)
    True
    >>> bool(cl.metrics.conservation_error(y, heat).abs().max() < 1e-12)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        constraints: Any,
        *,
        spacing: float | Sequence[float] | None = None,
        extent: float | Sequence[float] | None = None,
        endpoint: bool = True,
        lift: int = 0,
        mode: str = "output",
        rcond: float = 1e-2,
        refresh: int = 1,
        kernel_grad: str = "exact",
        noise: float | Tensor | Sequence[float] = 0.0,
        metric: str = "covariance",
        grid_shape: Sequence[int] | None = None,
        normalizer: object = None,
        adapter: Any = None,
        debug: bool = False,
        layout: str = "auto",
    ) -> None:
        call = type(self).__name__
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{call}: expected the model to be a torch.nn.Module, got {type(model).__name__}."
                " Wrap a plain function in an nn.Module first."
            )
        self.model = model
        if adapter is None:
            from .adapters import find  # the registry: model-agnostic, imports no model library

            adapter = find(model)
        if not all(hasattr(adapter, a) for a in ("read", "write", "constrain", "attach")):
            raise TypeError(
                f"{call}: adapter must be a constraint_layers.adapters.Adapter (an instance of a "
                f"subclass), got {type(adapter).__name__}."
            )
        self.adapter = adapter
        self._handles: list[Any] = []
        self.constraints = self._accept(constraints, call)
        self.layout = _resolve_layout(layout, adapter, model, self.constraints, call)
        check_grid_options(spacing, extent, call)
        # the wrapper's grid is every constraint's: integrals take it (a conflict raises)
        self.constraints = bind_grid(self.constraints, spacing, extent, endpoint, call)
        self.spacing = spacing
        self.extent = extent
        self.endpoint = bool(endpoint)
        self.lift = check_lift(lift, call)
        if mode not in _MODES:
            raise ValueError(f"{call}: mode must be one of {_MODES}, got {mode!r}.")
        self.mode = mode
        if mode == "refine" and self.layout == "points":
            raise GridError(
                f"{call}: mode='refine' refines the Fourier layers of a model for a grid's "
                f"boundary conditions; {type(model).__name__}'s output is a point cloud, which "
                "has no faces to refine for. Use mode='output' with point constraints "
                "(cl.Dirichlet(points=), cl.NormalComponent, cl.Conservation.integral(weights=))."
            )
        if not (isinstance(rcond, float | int) and not isinstance(rcond, bool) and 0 <= rcond < 1):
            raise ValueError(f"{call}: rcond must be a number in [0, 1), got {rcond!r}.")
        self.rcond = float(rcond)
        if isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1:
            raise ValueError(f"{call}: refresh must be a positive int, got {refresh!r}.")
        self.refresh = refresh
        if kernel_grad not in KERNEL_GRADS:
            raise ValueError(
                f"{call}: kernel_grad must be one of {KERNEL_GRADS}, got {kernel_grad!r}."
            )
        self.kernel_grad = kernel_grad
        self.noise = _check_noise(noise, self.constraints, call)
        if metric not in METRICS:
            raise ValueError(f"{call}: metric must be one of {METRICS}, got {metric!r}.")
        self.metric = metric
        if grid_shape is not None:
            grid_shape = _check_grid_shape(grid_shape, call)
            if not grid_shape or min(grid_shape) < 1:
                raise ValueError(f"{call}: grid_shape must hold positive sizes, got {grid_shape}.")
        self.grid_shape = grid_shape
        # held, not owned: a module assigned normally would join state_dict, .to() and .train()
        object.__setattr__(self, "normalizer", check_normalizer(normalizer, call))
        self.debug = bool(debug)
        self.refinements: list[Refinement] = []
        self._context = RefinementContext()
        if mode == "refine":
            if not self.bcs:
                raise ValueError(
                    f"{call}: mode='refine' refines the model for boundary conditions; none "
                    "were given."
                )
            if not getattr(self.adapter, "supports_refinement", False):
                raise ValueError(
                    f"{call}: mode='refine' needs an adapter that can refine the model's layers "
                    f"(neuraloperator FNO / TFNO); {self.adapter!r} serving "
                    f"{type(model).__name__} cannot. Use mode='output' (exact all the same)."
                )
        self.adapter.attach(self)

    # ------------------------------------------------------------------------------ setup
    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        return _check_constraints(constraints, call)

    @property
    def bcs(self) -> tuple[Any, ...]:
        """The boundary conditions, in the order given."""
        return tuple(c for c in self.constraints if c.family == "boundary")

    @property
    def conservation(self) -> tuple[Any, ...]:
        """The conservation constraints, in the order given."""
        return tuple(c for c in self.constraints if c.family == "conservation")

    @property
    def grid(self) -> GridSpec:
        return GridSpec(self.spacing, self.extent, self.endpoint)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            adapter = self.__dict__.get("adapter")
            if adapter is None or (name.startswith("__") and name.endswith("__")):
                raise
            return adapter.wrapper_attribute(self, name)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ConstraintLayer:
        """``Module._apply`` (behind ``.to``, ``.type``, ``.double``, ...), refusing a cast that
        would make the model's complex tensors real (see :func:`_refuse_lossy_cast`)."""
        _refuse_lossy_cast(self, fn)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        # after construction, a public name the wrapper lacks but the model has is meant for the
        # model (`wrapper.n_modes = ...`): set on the wrapper it would change nothing
        d = self.__dict__
        if (
            "_context" in d
            and not name.startswith("_")
            and name not in d
            and not hasattr(type(self), name)
            and name not in d.get("_parameters", {})
            and name not in d.get("_buffers", {})
            and name not in d.get("_modules", {})
        ):
            model = d.get("_modules", {}).get("model")
            if model is not None and hasattr(model, name):
                raise AttributeError(
                    f"{type(self).__name__}: {name!r} is an attribute of the wrapped model "
                    f"({type(model).__name__}), not of the wrapper: set on the wrapper it would "
                    f"change nothing. Set it on the model: wrapped.model.{name} = ..."
                )
        super().__setattr__(name, value)

    def add_handle(self, handle: Any) -> None:
        """Keep a hook handle that :meth:`release` removes (hooks on the wrapped model)."""
        self._handles.append(handle)

    def release(self) -> nn.Module:
        """Remove every hook this wrapper placed on the model and return the model."""
        while self._handles:
            self._handles.pop().remove()
        return self.model

    def add_refinement(
        self, layer: nn.Module, spectrum: Callable[[tuple[int, ...]], Any] | None = None
    ) -> Refinement:
        """Refine ``layer`` (a shift-invariant affine layer inside the model) during this
        wrapper's calls; used by adapters in ``attach``. Returns the hook object.

        ``spectrum(grid)``, optional, returns the layer's weights at its retained modes on the
        layer's grid (a :class:`~constraint_layers.boundary.spectral.SpectralKernel`): the
        refinement is then computed in closed form; without it the layer is probed with
        impulses."""
        hook = Refinement(
            self._context,
            rcond=self.rcond,
            refresh=self.refresh,
            kernel_grad=self.kernel_grad,
            spectrum=spectrum,
        )
        for handle in hook.attach(layer):
            self.add_handle(handle)
        self.refinements.append(hook)
        return hook

    # ------------------------------------------------------------------------ the call path
    def _bind(self, kwargs: dict) -> tuple[Any, ...]:
        """This call's constraints: ``cl.Given`` values taken out of ``kwargs`` (checked)."""
        return bind_given(self.constraints, kwargs, type(self).__name__)

    def base_output(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output as this wrapper sees it before the projection (with
        ``mode="refine"``: the refined model's). Keywords that feed ``cl.Given`` values are left
        out of the model call."""
        given = given_names(self.constraints)
        kwargs = {k: v for k, v in kwargs.items() if k not in given}
        return self._call_model(args, kwargs)

    def _call_model(self, args: tuple, kwargs: dict) -> Any:
        if self.mode != "refine":
            return self.adapter.call(self.model, args, kwargs)
        inputs = self.adapter.model_input(args, kwargs)
        with self._context.call(self.bcs, inputs, f"{type(self).__name__}(mode='refine')"):
            return self.adapter.call(self.model, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.jit.is_tracing():
            raise NotImplementedError(_NO_TRACE.format(call=type(self).__name__))
        kwargs = dict(kwargs)
        constraints = self._bind(kwargs)
        inputs = self.adapter.model_input(args, kwargs)
        out = self._call_model(args, kwargs)
        return self.adapter.constrain(out, lambda pred: self.project(pred, inputs, constraints))

    def project(
        self,
        pred: Gaussian | Tensor,
        inputs: Any = None,
        constraints: Sequence[Any] | None = None,
        *,
        physical: bool = False,
    ) -> Gaussian | Tensor:
        """Enforce the constraints (default: this wrapper's) on one prediction.

        ``pred``: the record the adapter reads (:class:`~constraint_layers.functional.Gaussian`;
        a deterministic one has no variance), or a grid tensor; returns the same kind. In the
        model's units (through the normaliser, if any), or already in physical units with
        ``physical=True``.
        """
        constraints = self.constraints if constraints is None else constraints
        if isinstance(pred, Tensor):
            record = Gaussian(pred, event_ndim=max(pred.ndim - 1, 1))
            return self.project(record, inputs, constraints, physical=physical).mean
        call = type(self).__name__
        _check_prediction(pred, call)
        if pred.mean.is_complex() and any(c.family == "conservation" for c in constraints):
            raise TypeError(
                f"{call}: conservation constraints act on real outputs, but the model's output is "
                f"complex ({pred.mean.dtype}). Constrain the real and imaginary parts as two "
                "channels (torch.view_as_real), or use boundary conditions only."
            )
        if math.prod(pred.mean.shape[: pred.mean.ndim - pred.event_ndim]) == 0:
            return pred  # an empty batch: nothing to constrain
        norm = None if physical else current_normalizer(self.normalizer)
        scale = None
        if norm is not None:
            pred, scale = _to_physical(pred, norm, call)
        with under_call(call):  # the dispatcher picks the solver by the rows' structure tags
            post = _engine_project(
                pred,
                constraints,
                layout=self.layout,
                grid=self.grid,
                lift=self.lift,
                noise=self.noise,
                metric=self.metric,
                grid_shape=self.grid_shape,
                inputs=inputs,
                call=call,
            )
        check_finite_now(post.mean, call, "constrained output (the projection overflowed the "
                         f"output dtype {post.mean.dtype}; use a wider dtype)")  # fmt: skip
        if self.debug:
            self._check(post, inputs, constraints)
        if norm is not None:
            post = _from_physical(post, norm, scale)
        return post

    def correct(self, y: Tensor, inputs: Any = None, bcs: Sequence[Any] | None = None) -> Tensor:
        """Enforce the constraints (default: this wrapper's) on an output grid ``y`` in physical
        units. shape: (batch, channels, d1, ..., dn)."""
        if not isinstance(y, Tensor):
            raise TypeError(
                f"{type(self).__name__}.correct: expected a tensor, got {type(y).__name__}."
            )
        return self.project(y, inputs, bcs, physical=True)

    def posterior(self, *args: Any, **kwargs: Any) -> Any:
        """The structured posterior of the model's output for these inputs (flattened event):
        a :class:`~constraint_layers.functional.ConstrainedGaussian` with ``.sample()``.

        The model's Gaussian as its adapter reads it (for an ensemble: its moment-matched
        Gaussian); in physical units when a normaliser is set.
        """
        from ._engine.streaming import _posterior

        kwargs = dict(kwargs)
        constraints = self._bind(kwargs)
        bnd, con = split_families(constraints)
        if self.layout == "points":
            raise NotImplementedError(
                f"{type(self).__name__}.posterior: the structured posterior serves grid outputs; "
                "on a point cloud call the wrapper (its output carries the conditioned Gaussian)."
            )
        if bnd or any(c.family == "bounds" for c in constraints):
            raise NotImplementedError(
                f"{type(self).__name__}.posterior: the structured posterior serves conservation "
                "constraints; with boundary conditions or bounds call the wrapper (its output "
                "carries the conditioned Gaussian)."
            )
        out = self.adapter.call(self.model, args, kwargs)
        g = self.adapter.read(out)
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = _to_physical(g, norm, type(self).__name__)
        k = g.event_ndim
        shape = grid_view(g.mean, k, self.grid_shape, f"{type(self).__name__}.posterior")
        lead = g.mean.shape[: g.mean.ndim - k]
        with under_call(f"{type(self).__name__}.posterior"):
            return _posterior(
                g.mean, g.variance, g.covariance, g.low_rank, con, shape, lead, k,
                self.noise, self.metric, self.adapter.model_input(args, kwargs),
            )  # fmt: skip

    def residual(self, output: Any, inputs: Any = None, **given: Any) -> Tensor:
        """Signed residual of every row on a model output (physical units), float64: shape
        (batch, M), the boundary rows (where each condition is in charge), the conservation
        rows, then the local rows. ``given``: values of ``cl.Given`` constraints."""
        constraints = self._bind(dict(given))
        g = self.adapter.read(output)
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = _to_physical(g, norm, type(self).__name__)
        return self._residual(g, inputs, constraints)

    def _residual(self, g: Gaussian, inputs: Any, constraints: Sequence[Any]) -> Tensor:
        call = type(self).__name__
        if self.layout == "points":
            return point_residual(g.mean, g.event_ndim, constraints, inputs, call)
        shape = grid_view(g.mean, g.event_ndim, self.grid_shape, call)
        y = g.mean.reshape(shape)
        bnd, con = split_families(constraints)
        parts = []
        if bnd:
            res = boundary_residuals(
                y, bnd, spacing=self.spacing, extent=self.extent, endpoint=self.endpoint,
                inputs=inputs, include_overridden=False,
            )  # fmt: skip
            for sides in res:
                for r in sides:
                    parts.append(r.reshape(shape[0], -1).to(torch.float64))
        for c in con:
            parts.append(c.residual(y, inputs=inputs))
        for c in constraints:  # local rows (structure tag "local"): one per node
            if getattr(c, "structure", None) == "local":
                parts.append(c.rows(shape, grid=self.grid, inputs=inputs).residual(y))
        return torch.cat(parts, dim=-1)

    def _check(self, post: Gaussian, inputs: Any, constraints: Sequence[Any]) -> None:
        """The debug check: every row's residual against the residual tolerance."""
        call = type(self).__name__
        if self.layout == "points":
            check_point_residual(post.mean.detach(), post.event_ndim, constraints, inputs, call)
            bounds = [c for c in constraints if c.family == "bounds"]
            if bounds:
                _check_bounds(post.mean.detach(), bounds, inputs, tuple(post.mean.shape), call)
            return
        shape = grid_view(post.mean, post.event_ndim, self.grid_shape, call)
        y = post.mean.detach().reshape(shape)
        tol = tolerance(y.dtype).residual
        scale = float(y.abs().max()) + 1.0 if y.numel() else 1.0
        bnd, con = split_families(constraints)
        worst: list[tuple[float, Any]] = []
        if bnd:
            res = boundary_residuals(
                y, bnd, spacing=self.spacing, extent=self.extent, endpoint=self.endpoint,
                inputs=inputs, include_overridden=False,
            )  # fmt: skip
            hs = resolve_spacing(y.shape[2:], spacing=self.spacing, extent=self.extent,
                                 endpoint=self.endpoint)  # fmt: skip
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
                rows = c.rows(shape, grid=self.grid, inputs=inputs)
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
            _check_bounds(y, bounds, inputs, tuple(post.mean.shape), call)

    def extra_repr(self) -> str:
        opts = [f"constraints={list(self.constraints)}"]
        if self.layout == "points":
            opts.append("layout='points'")
        if self.bcs:
            opts.append(f"mode={self.mode!r}")
        if self.lift:
            opts.append(f"lift={self.lift}")
        if self.conservation:
            opts.append(f"metric={self.metric!r}")
            if not (isinstance(self.noise, (int, float)) and self.noise == 0):
                opts.append(f"noise={self.noise}")
        if self.grid_shape is not None:
            opts.append(f"grid_shape={self.grid_shape}")
        return ", ".join(opts)


def _refuse_lossy_cast(wrapper: nn.Module, fn: Callable[[Tensor], Tensor]) -> None:
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


def _check_bounds(
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


def _check_noise(noise: Any, constraints: Sequence[Any], call: str) -> Any:
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


def _check_grid_shape(grid_shape: Any, call: str) -> tuple[int, ...]:
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


def _check_prediction(pred: Gaussian, call: str) -> None:
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


class BoundaryCorrection(ConstraintLayer):
    """Wrap a grid model so that its outputs satisfy boundary conditions exactly (BOON's output
    step; with ``mode="refine"`` also its kernel refinement).

    ``cl.BoundaryCorrection(model, bcs, **options)`` is the one layer
    (:class:`ConstraintLayer`) restricted to boundary conditions; see it for the options.

    Parameters
    ----------
    model : nn.Module
        A model whose output is (or, through its adapter, contains) a channel-first grid.
    constraints : BoundaryCondition or sequence of them
        Applied in order; where two meet the later one holds.
    rcond : float, default 1e-2
        ``mode="refine"``: Tikhonov parameter of the boundary-block solve, relative to the
        largest Frobenius norm of its per-frequency blocks (0: the pseudo-inverse); directions
        far above it are inverted to rounding, those near or below it are damped instead of
        blowing up. The default is the trained-accuracy optimum measured on heat and Burgers
        (``examples/boundary_paper/RESULTS.md``, "rcond"): 1e-5, closer to exact elimination,
        trained 6x to 16x worse than the plain FNO there.
    refresh : int, default 1
        ``mode="refine"``: 1 gives exact gradients (each refined layer's boundary block is
        rebuilt inside the autograd graph at every training call, in closed form from the
        weights for neuraloperator spectral convolutions); ``k > 1`` reuses a frozen one for
        ``k`` weight changes, in training and inference alike: approximate gradients, and no
        faster for neuraloperator layers (the default evaluates them in one pass; a frozen
        block needs the layer's own forward). Without gradients it is reused while the weights
        are equal (compared by value).
    kernel_grad : {"exact", "detached"}, default "exact"
        ``mode="refine"``: ``"detached"`` rebuilds the boundary block at every call but treats
        it (and the boundary-to-interior coupling) as a constant for autograd: the "frozen"
        variant of the boundary-paper study (it trains worse; kept for comparisons).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> net = torch.nn.Conv1d(2, 1, 3, padding=1)
    >>> model = cl.BoundaryCorrection(net, [cl.Dirichlet(0.0)])
    >>> out = model(torch.randn(8, 2, 32))
    >>> bool((out[..., 0] == 0).all() and (out[..., -1] == 0).all())
    True
    >>> cl.unwrap(model) is net
    True

    References
    ----------
    Saad et al., "Guiding continuous operator learning through physics-based boundary
    constraints", ICLR 2023.
    """

    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        items = boundary_conditions(constraints, call)
        if not items:
            raise ValueError(f"{call}: expected at least one boundary condition, got none.")
        return items


class ConservationProjection(ConstraintLayer):
    """Wrap a model so that its outputs satisfy conservation constraints exactly (ProbConserv;
    HardC for deterministic outputs).

    ``cl.ConservationProjection(model, constraints, **options)`` is the one layer
    (:class:`ConstraintLayer`) restricted to conservation constraints; see it for the options.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> class Head(torch.nn.Module):  # returns (mean, variance) on a (batch, 1, x) grid
    ...     def forward(self, x):
    ...         return torch.sin(x), 0.1 + x**2
    >>> model = cl.wrap(Head(), cl.Conservation.integral(0.0, extent=2.0))
    >>> mean, var = model(torch.linspace(0, 2, 21).reshape(1, 1, 21))
    >>> float(cl.metrics.conservation_error(mean, model.constraints[0]).abs().max()) < 1e-6
    True

    References
    ----------
    Hansen et al., "Learning Physical Models that Can Respect Conservation Laws", ICML 2023,
    arXiv:2302.11002.
    """

    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        return constraints_of(constraints, call)


# ------------------------------------------------------------------------ normalisation
def check_normalizer(obj: object, call: str) -> object:
    """Validate an output normaliser (``transform`` / ``inverse_transform``) or its holder."""
    if obj is None or (hasattr(obj, "transform") and hasattr(obj, "inverse_transform")):
        return obj
    if hasattr(obj, "out_normalizer"):
        return obj
    raise TypeError(
        f"{call}: normalizer must have transform() and inverse_transform() (e.g. neuraloperator's "
        "UnitGaussianNormalizer) or hold one as .out_normalizer (e.g. a DefaultDataProcessor); got "
        f"{type(obj).__name__}."
    )


def current_normalizer(obj: object) -> Any:
    """The normaliser to use now: ``obj`` itself, or ``obj.out_normalizer`` read at this call (so a
    normaliser fitted after wrapping is used)."""
    if obj is None or hasattr(obj, "transform"):
        return obj
    return obj.out_normalizer


def _scale(norm: Any, like: Tensor) -> Tensor:
    """The elementwise scale of an affine ``inverse_transform``: ``inv(1) - inv(0)``."""
    return norm.inverse_transform(torch.ones_like(like)) - norm.inverse_transform(
        torch.zeros_like(like)
    )


def _to_physical(g: Gaussian, norm: Any, call: str = "ConstraintLayer") -> tuple[Gaussian, Tensor]:
    s = _scale(norm, g.mean)
    mean = norm.inverse_transform(g.mean)
    what = "normalizer's scale (inverse_transform(1) - inverse_transform(0))"
    check_finite_now(s, call, what)
    if not bool((s.detach() != 0).all()):
        raise ValueError(
            f"{call}: the {what} holds zeros; expected a non-zero scale (a normalizer fitted on "
            "constant data has std 0: add a small eps)."
        )
    check_finite_now(mean, call, "output in physical units (the normalizer's inverse_transform)")
    var = None if g.variance is None else g.variance * s.square()
    sf = flat_event(s, g.event_ndim)
    cov, low = g.covariance, g.low_rank
    if cov is not None:
        cov = cov * (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if low is not None:
        low = low * sf.unsqueeze(-1)
    return g._replace(mean=mean, variance=var, covariance=cov, low_rank=low), s


def _from_physical(post: Gaussian, norm: Any, s: Tensor) -> Gaussian:
    mean = norm.transform(post.mean)
    var = None if post.variance is None else post.variance / s.square()
    sf = flat_event(s, post.event_ndim)
    cov, down = post.covariance, post.downdate
    if cov is not None:
        cov = cov / (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if down is not None:
        down = down / sf.unsqueeze(-1)
    # The structured posterior is in physical units: adapters fall back to the record's fields.
    return post._replace(mean=mean, variance=var, covariance=cov, downdate=down, conditioned=None)
