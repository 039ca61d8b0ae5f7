"""Boundary conditions on channel-first grid outputs: Dirichlet, Neumann, Periodic.

A condition is data: on each face point it states one row ``c . u = d`` (its stencil), the
direction in which the face-local output step moves the nodes to satisfy it (its mobility, with or
without a smooth lift next to the face) and the entry re-solved exactly at the end (its pivot).
The engine (:func:`constraint_layers.functional.enforce_boundary`) runs every condition through
the same update; the rows are public through :meth:`BoundaryCondition.rows`.

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
from torch import Tensor

from .._values import Given, check_finite_now, check_value, evaluate_value, shape_hint, shown_value
from ..errors import GridError
from ..rows import DEFAULT_GRID, GridSpec, Rows
from .stencils import OUTWARD_STENCILS, lift_profile, neumann_lift_profile

__all__ = ["BoundaryCondition", "Dirichlet", "Neumann", "Periodic"]

Side = Literal["low", "high", "both"]
Value = float | Tensor | Callable[[Any], Tensor] | Given
#: One entry of a row or a direction: (side, inward offset from that face, coefficient).
Term = tuple[str, int, float]
_SIDES = ("low", "high", "both")


class BoundaryCondition:
    """Base class of the boundary conditions: a linear condition on one spatial axis.

    Subclasses state their data: :meth:`stencil` (the row on one face point), :meth:`mobility`
    (how the output step moves the nodes), :meth:`pivot` (the node re-solved exactly), and
    :attr:`row_sides` (the faces that carry rows).
    """

    #: Which layer step enforces the constraint (``cl.wrap`` dispatches on it).
    family: ClassVar[str] = "boundary"
    #: The structure tag the engine's dispatcher reads: rows solved face by face, in closed form.
    structure: ClassVar[str] = "face"
    #: The attribute holding the constraint's value (``cl.Given`` binding).
    value_attr: ClassVar[str] = "value"
    #: Whether the row is a derivative (its residual compares with ``value * h``).
    derivative: ClassVar[bool] = False

    def __init__(
        self,
        value: Value = 0.0,
        *,
        dim: int | None = None,
        side: Side = "both",
        channels: int | Sequence[int] | None = None,
    ) -> None:
        name = type(self).__name__
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int)):
            raise TypeError(f"{name}: dim must be an int (a spatial axis index), got {dim!r}.")
        if side not in _SIDES:
            raise ValueError(f"{name}: side must be one of {_SIDES}, got {side!r}.")
        self._dim = dim
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
            items = channels.tolist() if isinstance(channels, Tensor) else list(channels)
            bad = [c for c in items if isinstance(c, bool) or not isinstance(c, int)]
            if bad:
                raise TypeError(
                    f"{name}: channels must be ints (channel indices), got {bad[0]!r} in "
                    f"{channels!r}."
                )
            out = tuple(items)
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
    def dim(self) -> int:
        """The spatial axis (0 when none was given: valid on one-axis grids only)."""
        return 0 if self._dim is None else self._dim

    def axis(self, n_spatial: int, call: str) -> int:
        """The spatial axis on a grid of ``n_spatial`` axes, ``0 <= axis < n_spatial``.

        A condition given without ``dim`` is valid on one-axis grids only: on several axes (time
        counts as an axis) it would be a guess which faces are meant.
        """
        from .._grid import normalize_dim

        if self._dim is None:
            if n_spatial > 1:
                raise GridError(
                    f"{call}: {self!r} was given without dim=, but the output has {n_spatial} "
                    "spatial axes (time frames count as one). Say which axis it holds on: "
                    f"{type(self).__name__}(..., dim=0) for the first axis after the channels; "
                    "give one condition per constrained axis."
                )
            return 0
        return normalize_dim(self._dim, n_spatial, f"{call}: {self!r}")

    @property
    def sides(self) -> tuple[str, ...]:
        """The sides this condition acts on: ``("low",)``, ``("high",)`` or both."""
        return ("low", "high") if self.side == "both" else (self.side,)

    @property
    def row_sides(self) -> tuple[str, ...]:
        """The faces whose points carry one row each."""
        return self.sides

    @property
    def reach(self) -> int:
        """How many nodes, counted inward from the face, the condition reads."""
        return 1

    # ------------------------------------------------------------------------------ the data
    def stencil(self, side: str, h: float) -> list[Term]:
        """The row on one face point of ``side``: entries ``(side, inward offset, coefficient)``."""
        raise NotImplementedError

    def mobility(self, side: str, h: float, lift: int) -> list[Term]:
        """The direction ``v`` in which the output step moves the nodes for that row, scaled so
        that ``c . v = 1``; with ``lift = k`` the move is spread smoothly over the ``k`` nodes
        next to the face."""
        raise NotImplementedError

    def pivot(self, side: str) -> tuple[str, int]:
        """The entry ``(side, offset)`` of the row re-solved exactly at the end of the step."""
        return (side, 0)

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> Rows:
        """The rows ``C u = d`` this condition states for an output of ``shape``.

        Parameters
        ----------
        shape : sequence of int
            The output shape ``(batch, channels, d1, ..., dn)``.
        grid : GridSpec, optional
            Spacing / extent / endpoint of the grid (default: unit extent, both ends on the grid).
        inputs : any, optional
            The model input, for values given as callables.

        Returns
        -------
        Rows
            One row per face point (and channel), with the mobility of the face-local step.
        """
        from .._engine.faces import boundary_rows  # the set-level builder (corners, lift)

        return boundary_rows(
            shape,
            [self],
            spacing=grid.spacing,
            extent=grid.extent,
            endpoint=grid.endpoint,
            inputs=inputs,
        )[0]

    def structure_key(self) -> tuple:
        """What the rows' structure depends on (not the value): for caches."""
        return (type(self), self._dim, self.side, self.channels, self.reach)

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
        if value.is_complex() and not dtype.is_complex:
            raise TypeError(
                f"{where}: the value is complex ({value.dtype}) but the output is real ({dtype}); "
                "a real output cannot take a complex boundary value."
            )
        wide = value.is_floating_point() or value.is_complex()
        narrowing = wide and torch.finfo(value.dtype).max > torch.finfo(dtype).max
        value = value.to(dtype=dtype, device=device)
        if narrowing:  # a finite value beyond the range of the output dtype became inf
            check_finite_now(
                value, where, f"value (converted to the output dtype {dtype}: it overflows; "
                "use a wider dtype)"
            )  # fmt: skip
        face_shape = tuple(face_shape)
        try:
            shape = torch.broadcast_shapes(value.shape, face_shape)
        except RuntimeError:
            shape = None
        if shape != face_shape:
            raise GridError(
                f"{where}: value of shape {tuple(value.shape)} does not broadcast to the face "
                f"shape {face_shape} = (batch, channels, *face dims). Give one value per face "
                "point, broadcastable from the right "
                f"({shape_hint(tuple(face_shape), 'face dims (e.g. time frames)')})."
            )
        return value

    def __repr__(self) -> str:
        value = shown_value(self, "value")
        if isinstance(value, Tensor):
            value = f"tensor{tuple(value.shape)}"
        elif callable(value):
            value = getattr(value, "__name__", "callable")
        parts = [f"{value}"]
        if self._dim is not None:
            parts.append(f"dim={self._dim}")
        parts.append(f"side={self.side!r}")
        if self.channels is not None:
            parts.append(f"channels={list(self.channels)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _profile(side: str, weights: Sequence[float], scale: float = 1.0) -> list[Term]:
    return [(side, j, scale * w) for j, w in enumerate(weights)]


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
    dim : int, optional
        The spatial axis (0 is the first axis after the channels). Required when the output has
        more than one spatial axis (time frames count as one).
    side : {"low", "high", "both"}, default "both"
        Which end(s) of the axis.
    channels : int or sequence of int, optional
        The output channels the condition applies to (default: all).
    points : Tensor or sequence, optional
        On a point-cloud output ``(batch, n_points, channels)``: the points that hold the value
        (a bool mask or indices); ``cl.Dirichlet(value, points=...)`` then makes a
        :class:`~constraint_layers.pointcloud.PointValue` (``dim`` and ``side`` do not apply).

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

    def __new__(cls, value: Value = 0.0, *, points: Any = None, **kwargs: Any) -> Any:
        if points is None:
            return super().__new__(cls)
        # values at points of a point cloud: a constraint of the point-cloud family
        from ..pointcloud.constraints import PointValue

        extra = sorted(k for k, v in kwargs.items() if k != "channels" and v not in (None, "both"))
        if extra:
            raise TypeError(
                f"Dirichlet(points=...): {extra} describe faces of a grid; values at points of a "
                "point cloud take value, points and channels only."
            )
        return PointValue(value, points=points, channels=kwargs.get("channels"))

    def __init__(
        self,
        value: Value = 0.0,
        *,
        dim: int | None = None,
        side: Side = "both",
        channels: int | Sequence[int] | None = None,
        points: None = None,
    ) -> None:
        super().__init__(value, dim=dim, side=side, channels=channels)

    def stencil(self, side, h):
        return [(side, 0, 1.0)]

    def mobility(self, side, h, lift):
        return _profile(side, lift_profile(lift) if lift else (1.0,))


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

    derivative = True

    def __init__(
        self,
        value: Value = 0.0,
        *,
        dim: int | None = None,
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

    def stencil(self, side, h):
        return [(side, j, c / h) for j, c in enumerate(OUTWARD_STENCILS[self.order])]

    def mobility(self, side, h, lift):
        c = OUTWARD_STENCILS[self.order]
        if not lift:
            return [(side, 0, h / c[0])]
        # a slope correction psi (psi_0 = 0) spread over the lift nodes: c . psi = 1 after scaling
        psi = neumann_lift_profile(lift)
        dpsi = sum(c[j] * psi[j] for j in range(1, min(len(c), lift + 1)))
        return _profile(side, psi, h / dpsi)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", order={self.order})"


class Periodic(BoundaryCondition):
    """Periodicity along one axis of a grid that holds both end points: ``u(low) = u(high)``.

    The correction sets both end nodes to their average (equal weight: the Euclidean projection
    onto ``u_0 = u_{N-1}``); both end up equal to the bit.

    Parameters
    ----------
    dim : int, optional
        The spatial axis. Required when the output has more than one spatial axis.
    channels : int or sequence of int, optional
        The output channels the condition applies to (default: all).

    Notes
    -----
    A grid that leaves out the end point (``linspace(0, 1, N + 1)[:-1]``, neuraloperator's default
    positional embedding) has no pair of nodes to equate: periodicity there is a property of the
    model (e.g. a Fourier basis), and :func:`.enforce_boundary` raises for ``endpoint=False``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> z = cl.functional.enforce_boundary(torch.randn(3, 2, 10), [cl.Periodic()])
    >>> bool((z[..., 0] == z[..., -1]).all())
    True
    """

    def __init__(
        self, *, dim: int | None = None, channels: int | Sequence[int] | None = None
    ) -> None:
        super().__init__(0.0, dim=dim, side="both", channels=channels)

    @property
    def row_sides(self):
        return ("low",)  # one row per face point links both ends

    def stencil(self, side, h):
        return [("low", 0, 1.0), ("high", 0, -1.0)]

    def mobility(self, side, h, lift):
        prof = lift_profile(lift) if lift else (1.0,)
        return _profile("low", prof, 0.5) + _profile("high", prof, -0.5)

    def pivot(self, side):
        return ("high", 0)

    def __repr__(self) -> str:
        parts = [] if self._dim is None else [f"dim={self._dim}"]
        if self.channels is not None:
            parts.append(f"channels={list(self.channels)}")
        return f"Periodic({', '.join(parts)})"
