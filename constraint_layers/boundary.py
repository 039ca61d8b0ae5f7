"""Boundary conditions on channel-first grid outputs, and the layer that enforces them.

The conditions (:class:`Dirichlet`, :class:`Neumann`, :class:`Periodic`) are small immutable
specifications. :class:`BoundaryCorrection` wraps a model and corrects every output so that the
conditions hold exactly (the output step of BOON, Saad et al., ICLR 2023).

Every condition is linear in the output ``u``: it states rows of ``C u = d`` (see
:meth:`BoundaryCondition.rows`). The fast path moves only the boundary node of each row (or spreads
the move smoothly over ``lift`` nodes next to the face); it equals the projection
``u - W C^T (C W C^T)^{-1} (C u - d)`` with ``W`` the mask of the nodes that may move.

Conventions
-----------
- Outputs are ``(batch, channels, d1, ..., dn)``; ``dim`` counts spatial axes (0 is ``d1``).
- The grid holds its boundary nodes; the spacing defaults to ``1 / (N - 1)`` per axis and is
  recomputed at every call.
- Neumann values are OUTWARD-normal derivatives: at the low side that is ``-du/dx``.
- Where two conditions meet (corners, edges), the one given later holds there; with incompatible
  corner data the earlier one is violated on the shared nodes only.

References
----------
Saad, Gupta, Alizadeh, Maddix. Guiding continuous operator learning through physics-based
boundary constraints. ICLR 2023. arXiv:2212.07477.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ._boundary_ops import (
    _check_lift,
    _conditions,
    _Face,
    boundary_residuals,
    enforce_boundary,
    spread,
)
from ._grid import check_grid_options, resolve_spacing
from ._refine import KERNEL_GRADS, Refinement, RefinementContext
from ._stencils import OUTWARD_STENCILS, neumann_lift_profile
from ._values import Given, bind_given, check_value, evaluate_value
from ._wrapper import TOLERANCE, ConstraintLayer, check_normalizer, current_normalizer
from .errors import ConstraintViolationError, GridError

__all__ = ["BoundaryCondition", "BoundaryCorrection", "Dirichlet", "Neumann", "Periodic"]

Side = Literal["low", "high", "both"]
Value = float | Tensor | Callable[[Any], Tensor] | Given
_SIDES = ("low", "high", "both")


class BoundaryCondition:
    """Base class of the boundary conditions: a linear condition on one spatial axis.

    Subclasses define the stencil (:meth:`_terms`) and the fast correction (:meth:`_apply_side`).
    """

    kind: ClassVar[str] = "boundary"
    #: Which layer enforces the constraint (``cl.wrap`` dispatches on it).
    family: ClassVar[str] = "boundary"

    def __init__(
        self,
        value: Value = 0.0,
        *,
        dim: int = 0,
        side: Side = "both",
        channels: int | Sequence[int] | None = None,
    ) -> None:
        name = type(self).__name__
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"{name}: dim must be an int (a spatial axis index), got {dim!r}.")
        if side not in _SIDES:
            raise ValueError(f"{name}: side must be one of {_SIDES}, got {side!r}.")
        self.dim = dim
        self.side: Side = side
        self.channels = self._check_channels(channels, name)
        self.value = self._check_value(value, name)

    # ----------------------------------------------------------------------------- validation
    @staticmethod
    def _check_channels(channels: object, name: str) -> tuple[int, ...] | None:
        if channels is None:
            return None
        if isinstance(channels, int) and not isinstance(channels, bool):
            return (channels,)
        if isinstance(channels, Sequence | Tensor) and not isinstance(channels, str):
            out = tuple(int(c) for c in channels)
            if not out:
                raise ValueError(f"{name}: channels must not be empty (use None for all channels).")
            if len(set(out)) != len(out):
                raise ValueError(f"{name}: channels hold duplicates: {out}.")
            return out
        raise TypeError(
            f"{name}: channels must be None, an int or a sequence of ints, got "
            f"{type(channels).__name__}."
        )

    @staticmethod
    def _check_value(value: object, name: str) -> Value:
        return check_value(
            value, name, "value", shapes=" broadcastable to the face (batch, channels, *face dims)"
        )

    # ------------------------------------------------------------------------------- geometry
    @property
    def sides(self) -> tuple[str, ...]:
        """The sides this condition acts on: ``("low",)``, ``("high",)`` or both."""
        return ("low", "high") if self.side == "both" else (self.side,)

    @property
    def reach(self) -> int:
        """How many nodes, counted inward from the face, the condition reads."""
        return 1

    # -------------------------------------------------------------------------------- values
    def resolve_value(
        self,
        dtype: torch.dtype,
        device: torch.device,
        face_shape: Sequence[int],
        inputs: Any,
        call: str,
    ) -> Tensor | float:
        """The value as a float or a tensor broadcastable to ``face_shape`` (in ``dtype``)."""
        where = f"{call}: {self!r}"
        value = evaluate_value(self.value, inputs, where, "value")
        if isinstance(value, float):
            return value
        value = value.to(dtype=dtype, device=device)
        face_shape = tuple(face_shape)
        try:
            shape = torch.broadcast_shapes(value.shape, face_shape)
        except RuntimeError:
            shape = None
        if shape != face_shape:
            raise GridError(
                f"{where}: value of shape {tuple(value.shape)} does not broadcast to the face "
                "shape "
                f"{face_shape} = (batch, channels, *face dims). Give one value per face point, "
                "broadcastable from the right (e.g. shape (T,) for one value per time frame, "
                "(batch, 1, 1, ...) for one value per sample)."
            )
        return value

    # -------------------------------------------------------------------- stencil description
    def _terms(self, side: str, h: float) -> list[tuple[str, int, float]]:
        """Row entries ``(side, inward offset, coefficient)`` of the condition at one face point."""
        raise NotImplementedError

    def _moves(self, side: str) -> list[tuple[str, int]]:
        """The nodes the output step moves, as ``(side, inward offset)``."""
        return [(side, 0)]

    def _row_sides(self) -> tuple[str, ...]:
        return self.sides

    def _apply_side(
        self, face: _Face, side: str, g: Tensor | float, h: float, lift: int, w: Tensor | None
    ) -> None:
        raise NotImplementedError

    def _apply(
        self, out: Tensor, axis: int, ch: Tensor | None, g, h: float, lift: int, w: Tensor | None
    ) -> None:
        """Correct ``out`` in place (``out`` is a tensor the caller owns)."""
        for side in self.sides:
            self._apply_side(_Face(out, axis, side, ch), side, g, h, lift, w)

    def _residuals(self, y: Tensor, axis: int, ch: Tensor | None, g, h: float) -> list[Tensor]:
        """The residual of each row family (one face tensor per side the rows live on)."""
        faces = {s: _Face(y, axis, s, ch) for s in ("low", "high")}
        return [
            sum(c * faces[s].read(j) for s, j, c in self._terms(side, h)) - g
            for side in self._row_sides()
        ]

    def __repr__(self) -> str:
        value = self.value
        if isinstance(value, Tensor):
            value = f"tensor{tuple(value.shape)}"
        elif callable(value):
            value = getattr(value, "__name__", "callable")
        parts = [f"{value}", f"dim={self.dim}", f"side={self.side!r}"]
        if self.channels is not None:
            parts.append(f"channels={list(self.channels)}")
        return f"{type(self).__name__}({', '.join(parts)})"


class Dirichlet(BoundaryCondition):
    """Prescribed values on a face: ``u = value``.

    Parameters
    ----------
    value : float, Tensor, callable or Given, default 0.0
        The boundary value: a number; a tensor broadcastable to the face
        ``(batch, channels, *face dims)`` (face dims: the spatial axes other than ``dim``, in order,
        e.g. time frames); a callable of the model input that returns such a tensor; or
        ``cl.Given("name")``: supplied with each call of the wrapped model as the keyword
        argument ``name`` (per-sample data that travel with the batch).
    dim : int, default 0
        The spatial axis (0 is the first axis after the channels).
    side : {"low", "high", "both"}, default "both"
        Which end(s) of the axis.
    channels : int or sequence of int, optional
        The output channels the condition applies to (default: all).

    Notes
    -----
    The corrected output holds the value to the bit (in the model's output dtype).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> y = torch.randn(2, 1, 16)
    >>> z = cl.functional.enforce_boundary(y, [cl.Dirichlet(1.5, side="low")])
    >>> bool((z[..., 0] == 1.5).all())
    True
    """

    kind = "dirichlet"

    def _terms(self, side, h):
        return [(side, 0, 1.0)]

    def _apply_side(self, face, side, g, h, lift, w):
        if lift:
            face.add_block(spread(g - face.read(0), lift, w))
        face.write(0, g)  # exact assignment last: bit-exact value


class Neumann(BoundaryCondition):
    """Prescribed outward-normal derivative on a face: ``du/dn = value``.

    The derivative is the one-sided finite difference of the given ``order`` (1, 2 or 3) on the
    grid; the correction solves that stencil for the boundary node, so the discrete flux equals
    ``value`` to rounding. At the low side the outward normal points to ``-x``: a value ``q`` there
    means ``du/dx = -q``.

    Parameters
    ----------
    value, dim, side, channels
        As for :class:`Dirichlet`.
    order : {1, 2, 3}, default 2
        Order of accuracy of the one-sided stencil (order 3 matches
        ``neuralop.losses.FiniteDiff`` at non-periodic boundaries).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> y = torch.randn(1, 1, 33, dtype=torch.float64)
    >>> bc = cl.Neumann(2.0, side="high")
    >>> z = cl.functional.enforce_boundary(y, [bc])
    >>> h = 1 / 32
    >>> round(float((1.5 * z[..., -1] - 2 * z[..., -2] + 0.5 * z[..., -3]) / h), 9)
    2.0
    """

    kind = "neumann"

    def __init__(
        self,
        value: Value = 0.0,
        *,
        dim: int = 0,
        side: Side = "both",
        channels: int | Sequence[int] | None = None,
        order: int = 2,
    ) -> None:
        if order not in OUTWARD_STENCILS:
            raise ValueError(
                f"Neumann: order must be one of {sorted(OUTWARD_STENCILS)}, got {order!r}."
            )
        self.order = order
        super().__init__(value, dim=dim, side=side, channels=channels)

    @property
    def reach(self) -> int:
        return self.order + 1

    def _terms(self, side, h):
        return [(side, j, c / h) for j, c in enumerate(OUTWARD_STENCILS[self.order])]

    def _apply_side(self, face, side, g, h, lift, w):
        c = OUTWARD_STENCILS[self.order]
        rest = sum(c[j] * face.read(j) for j in range(1, len(c)))
        if not lift:
            face.write(0, (h * g - rest) / c[0])
            return
        # residual of the flux, removed by a slope correction psi (psi_0 = 0) spread over the
        # `lift` nodes next to the face; where the spread must stay off nodes read by earlier
        # conditions (weight w < 1), the rest is taken by the boundary node alone.
        r = h * g - (c[0] * face.read(0) + rest)  # h * (g - du/dn)
        psi = neumann_lift_profile(lift)
        dpsi = sum(c[j] * psi[j] for j in range(1, min(len(c), lift + 1)))
        prof = torch.tensor(psi, dtype=face.v.dtype, device=face.v.device) / dpsi
        block = r.unsqueeze(-1) * prof
        if w is not None:
            node = torch.zeros_like(prof)
            node[0] = 1.0 / c[0]
            block = r.unsqueeze(-1) * (w.unsqueeze(-1) * prof + (1 - w).unsqueeze(-1) * node)
        face.add_block(block)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", order={self.order})"


class Periodic(BoundaryCondition):
    """Periodicity along one axis of a grid that holds both end points: ``u(low) = u(high)``.

    The correction sets both end nodes to their average (equal weight: the Euclidean projection
    onto ``u_0 = u_{N-1}``).

    Parameters
    ----------
    dim : int, default 0
        The spatial axis.
    channels : int or sequence of int, optional
        The output channels the condition applies to (default: all).

    Notes
    -----
    A grid that leaves out the end point (``linspace(0, 1, N + 1)[:-1]``, neuraloperator's default
    positional embedding) has no pair of nodes to equate: periodicity there is a property of the
    model (e.g. a Fourier basis), and :func:`enforce_boundary` raises for ``endpoint=False``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> z = cl.functional.enforce_boundary(torch.randn(3, 2, 10), [cl.Periodic()])
    >>> bool((z[..., 0] == z[..., -1]).all())
    True
    """

    kind = "periodic"

    def __init__(self, *, dim: int = 0, channels: int | Sequence[int] | None = None) -> None:
        super().__init__(0.0, dim=dim, side="both", channels=channels)

    def _row_sides(self):
        return ("low",)  # one row per face point links both ends

    def _terms(self, side, h):
        return [("low", 0, 1.0), ("high", 0, -1.0)]

    def _moves(self, side):
        return [("low", 0), ("high", 0)]

    def __repr__(self) -> str:
        chans = "" if self.channels is None else f", channels={list(self.channels)}"
        return f"Periodic(dim={self.dim}{chans})"

    def _apply(self, out, axis, ch, g, h, lift, w):
        low, high = _Face(out, axis, "low", ch), _Face(out, axis, "high", ch)
        avg = 0.5 * (low.read(0) + high.read(0))
        if lift:
            for face in (low, high):
                face.add_block(spread(avg - face.read(0), lift, w))
        low.write(0, avg)
        high.write(0, avg)


_MODES = ("output", "refine")


class BoundaryCorrection(ConstraintLayer):
    """Wrap a grid model so that its outputs satisfy boundary conditions exactly.

    ``forward`` is the model call followed by :func:`constraint_layers.functional.enforce_boundary`
    on the output grid. The wrapper is an ordinary module: it trains, fine-tunes, saves and loads
    like the model (its ``state_dict`` is the model's under the prefix ``model.``).

    Parameters
    ----------
    model : nn.Module
        A model whose output is (or, through its adapter, contains) a channel-first grid
        ``(batch, channels, d1, ..., dn)``. Held as ``self.model``, not copied.
    bcs : BoundaryCondition or sequence of them
        Applied in order; where two meet the later one holds.
    spacing, extent, endpoint, lift
        Grid description and smoothing, as for
        :func:`~constraint_layers.functional.enforce_boundary`.
    mode : {"output", "refine"}
        ``"output"``: correct the output grid (any grid model). ``"refine"``: also refine every
        Fourier layer of the model (BOON's kernel correction) so that each layer's boundary
        outputs depend only on its boundary inputs; needs an adapter that supports it
        (neuraloperator FNO / TFNO). The output step still makes the conditions exact.
    normalizer : object, optional
        The output normaliser of the training pipeline (``transform`` /
        ``inverse_transform``), or an object holding it as ``out_normalizer``
        (neuraloperator's ``DefaultDataProcessor``). The model then outputs normalised values;
        the conditions are stated in physical units and enforced on
        ``inverse_transform(output)`` before transforming back.
    adapter : Adapter, optional
        How to call the model and find its grid; default: looked up in the adapter registry.
    rcond : float, default 1e-5
        ``mode="refine"``: Tikhonov parameter of the boundary-block solve, relative to the
        largest Frobenius norm of its per-frequency blocks (0: the pseudo-inverse); directions
        far above it are inverted to rounding, those near or below it are damped instead of
        blowing up (the default keeps the refined interior within 0.1% of exact elimination up
        to 32 channels; see ``examples/boundary_paper/refine_rcond.py``).
    refresh : int, default 1
        ``mode="refine"``: 1 gives exact gradients (each refined layer's boundary block is
        rebuilt inside the autograd graph at every training call, in closed form from the
        weights for neuraloperator spectral convolutions); ``k > 1`` reuses a frozen one for
        ``k`` weight changes, in training and inference alike: approximate gradients. Without
        gradients it is reused while the weights are equal (compared by value, so changes
        through ``.data`` or ``n_modes`` are seen).
    kernel_grad : {"exact", "detached"}, default "exact"
        ``mode="refine"``: ``"detached"`` rebuilds the boundary block at every call but treats
        it (and the boundary-to-interior coupling) as a constant for autograd: the "frozen"
        variant of the boundary-paper study (it trains worse; kept for comparisons).
    debug : bool, default False
        Check the residual of every condition after each call (costs a pass over the faces) and
        raise :class:`~constraint_layers.errors.ConstraintViolationError` if it exceeds rounding.

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

    def __init__(
        self,
        model: nn.Module,
        bcs: BoundaryCondition | Sequence[BoundaryCondition],
        *,
        spacing: float | Sequence[float] | None = None,
        extent: float | Sequence[float] | None = None,
        endpoint: bool = True,
        lift: int = 0,
        mode: str = "output",
        normalizer: object = None,
        adapter: Any = None,
        rcond: float = 1e-5,
        refresh: int = 1,
        kernel_grad: str = "exact",
        debug: bool = False,
    ) -> None:
        call = "BoundaryCorrection"
        super().__init__(model, adapter)
        self.bcs = _conditions(bcs, call)
        if not self.bcs:
            raise ValueError(f"{call}: expected at least one boundary condition, got none.")
        if mode not in _MODES:
            raise ValueError(f"{call}: mode must be one of {_MODES}, got {mode!r}.")
        check_grid_options(spacing, extent, call)
        self.spacing = spacing
        self.extent = extent
        self.endpoint = bool(endpoint)
        self.lift = _check_lift(lift, call)
        self.mode = mode
        self.normalizer = check_normalizer(normalizer, call)
        self.debug = bool(debug)
        if not (isinstance(rcond, float | int) and 0 <= rcond < 1):
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
        self.refinements: list[Refinement] = []
        self._context = RefinementContext()
        if mode == "refine" and not getattr(self.adapter, "supports_refinement", False):
            raise ValueError(
                f"{call}: mode='refine' needs an adapter that can refine the model's layers "
                f"(neuraloperator FNO / TFNO); {self.adapter!r} serving {type(model).__name__} "
                "cannot. Use mode='output' (exact all the same)."
            )
        self._attach()

    def add_refinement(
        self, layer: nn.Module, spectrum: Callable[[tuple[int, ...]], Any] | None = None
    ) -> Refinement:
        """Refine ``layer`` (a shift-invariant affine layer inside the model) during this
        wrapper's calls; used by adapters in ``attach``. Returns the hook object.

        ``spectrum(grid)``, optional, returns the layer's weights at its retained modes on the
        layer's grid (a ``constraint_layers._spectral.SpectralKernel``): the refinement is then
        computed in closed form; without it the layer is probed with impulses."""
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

    def correct(
        self, y: Tensor, inputs: Any = None, bcs: Sequence[BoundaryCondition] | None = None
    ) -> Tensor:
        """Apply the conditions (default: this wrapper's) to an output grid ``y`` in physical
        units. shape: (batch, channels, d1, ..., dn)."""
        bcs = self.bcs if bcs is None else bcs
        z = enforce_boundary(
            y,
            bcs,
            spacing=self.spacing,
            extent=self.extent,
            endpoint=self.endpoint,
            lift=self.lift,
            inputs=inputs,
        )
        if self.debug:
            self._check(z, inputs, bcs)
        return z

    def base_output(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output as this wrapper sees it before the output step (with
        ``mode="refine"``: the refined model's). Keywords that feed ``cl.Given`` values are left
        out of the model call."""
        given = {bc.value.name for bc in self.bcs if isinstance(bc.value, Given)}
        kwargs = {k: v for k, v in kwargs.items() if k not in given}
        if self.mode == "refine":
            return self._refined_call(args, kwargs, self.adapter.model_input(args, kwargs))
        return self.adapter.call(self.model, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = dict(kwargs)
        bcs = bind_given(self.bcs, "value", kwargs, "BoundaryCorrection", "value")
        inputs = self.adapter.model_input(args, kwargs)
        out = self.base_output(*args, **kwargs)
        y = self.adapter.grid(out)
        norm = current_normalizer(self.normalizer)
        if norm is None:
            z = self.correct(y, inputs, bcs)
        else:
            z = norm.transform(self.correct(norm.inverse_transform(y), inputs, bcs))
        return self.adapter.with_grid(out, z)

    def _refined_call(self, args: tuple, kwargs: dict, inputs: Any) -> Any:
        with self._context.call(self.bcs, inputs, "BoundaryCorrection(mode='refine')"):
            return self.adapter.call(self.model, args, kwargs)

    def _check(
        self, z: Tensor, inputs: Any, bcs: Sequence[BoundaryCondition] | None = None
    ) -> None:
        bcs = self.bcs if bcs is None else bcs
        res = boundary_residuals(
            z,
            bcs,
            spacing=self.spacing,
            extent=self.extent,
            endpoint=self.endpoint,
            inputs=inputs,
            include_overridden=False,
        )
        tol = TOLERANCE.get(z.dtype, 1e-4)
        hs = resolve_spacing(
            z.shape[2:], spacing=self.spacing, extent=self.extent, endpoint=self.endpoint
        )
        scale = float(z.detach().abs().max()) + 1.0
        for bc, parts in zip(bcs, res):
            h = hs[bc.dim % (z.ndim - 2)] if bc.kind == "neumann" else 1.0
            worst = max(float(r.detach().abs().max()) for r in parts) * h
            if worst > tol * scale:
                raise ConstraintViolationError(
                    f"BoundaryCorrection(debug=True): {bc!r} has residual {worst / h:.3e} after "
                    f"correction (tolerance {tol * scale / h:.3e} for {z.dtype}). This is a bug: "
                    "please report it with the conditions and the output shape."
                )

    def extra_repr(self) -> str:
        opts = [f"bcs={list(self.bcs)}", f"mode={self.mode!r}"]
        if self.lift:
            opts.append(f"lift={self.lift}")
        return ", ".join(opts)
