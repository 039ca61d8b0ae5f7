"""The one constraint layer: any mix of constraint families, one call path.

A wrapper holds the model under the single name ``model`` (its ``state_dict`` is the model's under
the prefix ``model.``; ``unwrap`` returns the very object). Each call runs the same path:

    read the output through the adapter -> bind ``cl.Given`` values -> un-normalise ->
    project (:func:`constraint_layers.functional.project`'s path: the engine's dispatcher picks
    the solver by the rows' structure) -> re-normalise -> write back (-> optional debug check)

:class:`BoundaryCorrection` and :class:`ConservationProjection` are presets of it that accept one
family each, with the signatures of the first release (:mod:`constraint_layers._presets`). The
checks (one policy for every family, :mod:`constraint_layers._layer_checks`) and the output
normaliser (:mod:`constraint_layers._normalise`) live beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _layer_checks as checks
from ._bind_grid import bind_grid
from ._engine.faces import check_lift
from ._grid import check_grid_options
from ._joint import check_posterior, check_record, project_prediction, structured_posterior
from ._normalise import check_normalizer, current_normalizer, from_physical, to_physical
from ._values import bind_given, given_names
from .boundary.refine import Refinement, RefinementContext
from .conservation.gaussian import Gaussian
from .rows import GridSpec

#: ``BoundaryCorrection`` and ``ConservationProjection`` are reachable here too (module
#: ``__getattr__``); they live in :mod:`constraint_layers._presets`.
__all__ = [
    "ConstraintLayer",
    "check_normalizer",
    "current_normalizer",
]

#: Kept under their former names (``testing`` and adapters import them from here).
_to_physical, _from_physical = to_physical, from_physical


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
        self.adapter = checks.check_adapter(adapter, model, call)
        self._handles: list[Any] = []
        self.constraints = self._accept(constraints, call)
        self.layout = checks.resolve_layout(layout, self.adapter, model, self.constraints, call)
        check_grid_options(spacing, extent, call)
        # the wrapper's grid is every constraint's: integrals take it (a conflict raises)
        self.constraints = bind_grid(self.constraints, spacing, extent, endpoint, call)
        self.spacing = spacing
        self.extent = extent
        self.endpoint = bool(endpoint)
        self.lift = check_lift(lift, call)
        self.mode, self.rcond, self.refresh, self.kernel_grad = checks.check_refine_options(
            mode, rcond, refresh, kernel_grad, self.layout, model, call
        )
        self.noise = checks.check_noise(noise, self.constraints, call)
        self.metric = checks.check_metric(metric, call)
        self.grid_shape = checks.check_flat_grid(grid_shape, call)
        # held, not owned: a module assigned normally would join state_dict, .to() and .train()
        object.__setattr__(self, "normalizer", check_normalizer(normalizer, call))
        self.debug = bool(debug)
        self.refinements: list[Refinement] = []
        self._context = RefinementContext()
        if mode == "refine":
            checks.check_refinable(self, call)
        self.adapter.attach(self)

    def _accept(self, constraints: Any, call: str) -> tuple[Any, ...]:
        return checks.check_constraints(constraints, call)

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
        would make the model's complex tensors real
        (:func:`~constraint_layers._layer_checks.refuse_lossy_cast`)."""
        checks.refuse_lossy_cast(self, fn)
        return super()._apply(fn, recurse)

    def __setattr__(self, name: str, value: Any) -> None:
        checks.check_model_attribute(self, name)  # a name meant for the model raises
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
            raise NotImplementedError(checks.NO_TRACE.format(call=type(self).__name__))
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
        ``physical=True``. The path of :func:`constraint_layers.functional.project`.
        """
        constraints = self.constraints if constraints is None else constraints
        if isinstance(pred, Tensor):
            record = Gaussian(pred, event_ndim=max(pred.ndim - 1, 1))
            return self.project(record, inputs, constraints, physical=physical).mean
        call = type(self).__name__
        if not check_record(pred, constraints, call):
            return pred  # an empty batch: nothing to constrain
        norm = None if physical else current_normalizer(self.normalizer)
        scale = None
        if norm is not None:
            pred, scale = to_physical(pred, norm, call)
        post = project_prediction(
            pred, constraints, layout=self.layout, grid=self.grid, lift=self.lift,
            noise=self.noise, metric=self.metric, grid_shape=self.grid_shape, inputs=inputs,
            call=call, checked=True,
        )  # fmt: skip
        if self.debug:
            self._check(post, inputs, constraints)
        if scale is not None:
            post = from_physical(post, norm, scale)
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
        kwargs = dict(kwargs)
        constraints = self._bind(kwargs)
        call = f"{type(self).__name__}.posterior"
        check_posterior(constraints, self.layout, call)
        g = self.adapter.read(self.adapter.call(self.model, args, kwargs))
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = to_physical(g, norm, type(self).__name__)
        return structured_posterior(
            g, constraints, grid_shape=self.grid_shape, noise=self.noise, metric=self.metric,
            inputs=self.adapter.model_input(args, kwargs), call=call,
        )  # fmt: skip

    def residual(self, output: Any, inputs: Any = None, **given: Any) -> Tensor:
        """Signed residual of every row on a model output (physical units), float64: shape
        (batch, M), the boundary rows (where each condition is in charge), the conservation
        rows, then the local rows. ``given``: values of ``cl.Given`` constraints."""
        constraints = self._bind(dict(given))
        g = self.adapter.read(output)
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = to_physical(g, norm, type(self).__name__)
        return self._residual(g, inputs, constraints)

    def _residual(self, g: Gaussian, inputs: Any, constraints: Sequence[Any]) -> Tensor:
        return checks.residual_rows(self, g, inputs, constraints)

    def _check(self, post: Gaussian, inputs: Any, constraints: Sequence[Any]) -> None:
        checks.check_rows(self, post, inputs, constraints)  # the debug check

    def extra_repr(self) -> str:
        return checks.options_repr(self)


def __getattr__(name: str) -> Any:  # the presets subclass ConstraintLayer: no import cycle
    if name in ("BoundaryCorrection", "ConservationProjection"):
        from . import _presets

        return getattr(_presets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
