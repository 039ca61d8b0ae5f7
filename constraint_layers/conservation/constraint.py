"""Conservation constraints: linear equality rows ``G u = b`` on a model's output.

A conservation law ``u_t + div F(u) = 0`` has the integral form ``d/dt U(t) = net inflow``, with
``U(t)`` the integral of ``u(t, .)`` over the domain. Discretised with a quadrature rule on the
output grid, "the total at time t equals b(t)" is a LINEAR constraint on the predicted values:
``G u = b``, one row per time frame. :class:`Conservation` states such constraints
(:meth:`Conservation.integral` builds them from a quadrature rule); the layer
(:class:`~constraint_layers.ConservationProjection`, or ``cl.wrap``) makes every output of a model
satisfy them (ProbConserv, Hansen et al., ICML 2023):

- a Gaussian output ``N(mu, Sigma)`` (a GP, a variance head, an ensemble, a UQNO band) is
  conditioned on ``G u = b``: the mean conserves exactly and moves most where the model is least
  certain; the covariance is updated consistently;
- a deterministic output (a plain FNO) is projected orthogonally (the HardC baseline).

Every constraint is a set of rows of ``C u = d`` (see :meth:`Conservation.rows`), as the boundary
conditions are; the update is the projection ``u - W C^T (C W C^T)^{-1} (C u - d)`` with
``W = Sigma`` (or ``W = I``).

References
----------
Hansen, Maddix, Alizadeh, Gupta, Mahoney. Learning Physical Models that Can Respect Conservation
Laws. ICML 2023. arXiv:2302.11002.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._grid import normalize_dim
from .._values import check_value, evaluate_value, shape_hint, shown_value
from ..errors import GridError
from ..quadrature import RULES, cumulative_trapezoid, tensor_product
from ..quadrature import weights as quadrature_weights
from ..rows import DEFAULT_GRID, GridSpec, Rows

__all__ = [
    "Conservation",
    "IntegralConservation",
    "conservation_rows",
    "constraints_of",
    "mass_over_time",
]

F64 = torch.float64
Total = float | Tensor | Callable[[Any], Any]


class Conservation:
    """Linear equality constraints ``G u = b`` on each sample's flattened output.

    Parameters
    ----------
    G : Tensor
        shape: (M, N) shared by all samples, (batch, M, N) per sample, or (N,) for one row. ``N``
        is the number of values per sample (a grid output ``(batch, C, d1, ..., dn)`` flattens to
        ``N = C * d1 * ... * dn`` in C order).
    b : float, Tensor or callable, default 0.0
        The right-hand sides: a number; a tensor of shape (M,) or (batch, M) (or (batch,) when
        ``G`` is one row); or a callable of the model input returning one.

    See Also
    --------
    Conservation.integral : the grid form (a quadrature of the output, one row per frame).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> c = cl.Conservation(torch.ones(1, 6) / 6, torch.tensor([2.0]))  # the mean value is 2
    >>> model = cl.wrap(torch.nn.Linear(3, 6), c)
    >>> y = model(torch.randn(4, 3))
    >>> bool(torch.allclose(y.mean(-1), torch.full((4,), 2.0)))
    True
    """

    #: Which step of the engine enforces the constraint.
    family: ClassVar[str] = "conservation"
    #: The structure tag the engine's dispatcher reads: a few dense rows (``M x M`` solves).
    structure: ClassVar[str] = "dense"
    #: The attribute holding the constraint's value (``cl.Given`` binding).
    value_attr: ClassVar[str] = "b"

    def __init__(self, G: Tensor, b: Total = 0.0) -> None:
        name = type(self).__name__
        if not isinstance(G, Tensor):
            raise TypeError(
                f"{name}: G must be a tensor of shape (M, N), (batch, M, N) or (N,), got "
                f"{type(G).__name__}."
            )
        if G.ndim not in (1, 2, 3):
            raise ValueError(
                f"{name}: G must have shape (M, N), (batch, M, N) or (N,), got {tuple(G.shape)}."
            )
        if G.is_complex():
            raise TypeError(
                f"{name}: G must hold real numbers, got dtype {G.dtype}. Conservation acts on "
                "real outputs: constrain the real and imaginary parts as two channels "
                "(torch.view_as_real)."
            )
        if not bool(torch.isfinite(G.detach()).all()):
            raise ValueError(f"{name}: G holds NaN or inf; expected finite coefficients.")
        self.single = G.ndim == 1
        self.G = (G.unsqueeze(0) if self.single else G).to(
            G.dtype if G.is_floating_point() else F64
        )
        self.b = _real(check_value(b, name, "right-hand side"), name)

    @property
    def num_rows(self) -> int | None:
        """Rows per sample (None when it depends on the output shape)."""
        return int(self.G.shape[-2])

    # --------------------------------------------------------------------------- rows
    def _rhs(self, batch: int, m: int, inputs: Any, call: str) -> Tensor:
        value = evaluate_value(self.b, inputs, f"{call}: {self!r}", "right-hand side")
        b = torch.as_tensor(_real(value, f"{call}: {self!r}"), dtype=F64)
        if self.single and b.ndim >= 1:
            b = b.unsqueeze(-1)
        try:
            return torch.broadcast_to(b, (batch, m))
        except RuntimeError:
            shape = "(batch,)" if self.single else f"({m},) or (batch, {m})"
            raise ValueError(
                f"{call}: {self!r}: b of shape {tuple(torch.as_tensor(value).shape)} does not "
                f"match the {m} constraint row(s) and batch {batch}; expected a number or shape "
                f"{shape}."
            ) from None

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> Rows:
        """The rows ``C u = d`` for an output of ``shape`` = (batch, *event).

        ``grid`` is accepted for the common constraint protocol (a matrix ``G`` needs none).

        Returns
        -------
        Rows
            ``index`` (M, N), ``coeff`` (M, N) or (batch, M, N), ``rhs`` (batch, M).
        """
        call = "Conservation.rows"
        batch, n = int(shape[0]), math.prod(shape[1:])
        self._check_size(n, batch, call)
        m = self.G.shape[-2]
        index = torch.arange(n, device=self.G.device).expand(m, n)
        return Rows(index, self.G.to(F64), self._rhs(batch, m, inputs, call))

    def _check_size(self, n: int, batch: int, call: str) -> None:
        if self.G.shape[-1] != n:
            raise ValueError(
                f"{call}: {self!r} has {self.G.shape[-1]} columns, but each output sample holds "
                f"{n} values; G needs one column per value of the flattened output (C order)."
            )
        if self.G.ndim == 3 and self.G.shape[0] not in (1, batch):
            raise ValueError(
                f"{call}: {self!r} has a G per sample for {self.G.shape[0]} samples, but the "
                f"output has batch {batch}."
            )

    def dense(self, shape: Sequence[int], *, inputs: Any = None) -> tuple[Tensor, Tensor]:
        """``(G, b)`` as dense float64 tensors: (M, N) or (batch, M, N), and (batch, M)."""
        r = self.rows(shape, inputs=inputs)
        return r.dense(math.prod(shape[1:])), r.rhs

    def residual(self, y: Tensor, *, inputs: Any = None) -> Tensor:
        """Signed residual ``G u - b`` of an output ``y`` (batch, *event); shape (batch, M).

        Differentiable (usable as a soft penalty); computed in float64.
        """
        g, rhs = self.dense(y.shape, inputs=inputs)
        u = y.reshape(y.shape[0], -1).to(F64)
        out = u @ g.mT if g.ndim == 2 else (g @ u.unsqueeze(-1)).squeeze(-1)
        return out - rhs.to(y.device)

    # ------------------------------------------------------------------------ factories
    @classmethod
    def integral(
        cls,
        total: Total = 0.0,
        *,
        dim: int | Sequence[int] = 0,
        rule: str | Sequence[str] = "trapezoid",
        spacing: float | Sequence[float] | None = None,
        extent: float | Sequence[float] | None = None,
        grid: Tensor | Sequence[Tensor | None] | None = None,
        endpoint: bool = True,
        channels: int | Sequence[int] | None = None,
        weights: Any = None,
    ) -> IntegralConservation | Any:
        """The integral of a grid output over spatial axes ``dim`` equals ``total``.

        See :class:`IntegralConservation` for the parameters. With ``weights=`` (quadrature
        weights per point of a point-cloud output, ``(n_points,)`` or ``(R, n_points)``; a tensor,
        a callable of the input or ``cl.Given``) it is the weighted sum over the points instead:
        a :class:`~constraint_layers.pointcloud.PointIntegral` (``dim``, ``rule`` and the grid
        options do not apply).

        Examples
        --------
        >>> import torch, constraint_layers as cl
        >>> c = cl.Conservation.integral(0.0, dim=0)  # per frame of a (batch, 1, x, t) output
        >>> y = cl.functional.enforce_conservation(torch.randn(2, 1, 33, 5), c).mean
        >>> float(cl.metrics.conservation_error(y, c).abs().max()) < 1e-6
        True
        """
        if weights is not None:
            from ..pointcloud.constraints import PointIntegral

            grid_opts = {
                "dim": dim != 0,
                "rule": rule != "trapezoid",
                "spacing": spacing is not None,
                "extent": extent is not None,
                "grid": grid is not None,
                "endpoint": endpoint is not True,
            }
            extra = sorted(k for k, v in grid_opts.items() if v)
            if extra:
                raise TypeError(
                    f"Conservation.integral(weights=...): {extra} describe a grid; a weighted sum "
                    "over points takes total, weights and channels only."
                )
            return PointIntegral(total, weights=weights, channels=channels)
        return IntegralConservation(
            total,
            dim=dim,
            rule=rule,
            spacing=spacing,
            extent=extent,
            grid=grid,
            endpoint=endpoint,
            channels=channels,
        )

    def __repr__(self) -> str:
        b = shown_value(self, "b")
        if isinstance(b, Tensor):
            b = f"tensor{tuple(b.shape)}"
        elif callable(b):
            b = getattr(b, "__name__", "callable")
        return f"Conservation(G: {tuple(self.G.shape)}, b={b})"


def _real(value: Any, where: str) -> Any:
    """``value`` unchanged unless it is a complex tensor (a TypeError: conservation is real)."""
    if isinstance(value, Tensor) and value.is_complex():
        raise TypeError(
            f"{where}: the right-hand side must be real, got a complex tensor ({value.dtype}). "
            "Conservation acts on real outputs: constrain the real and imaginary parts as two "
            "channels (torch.view_as_real)."
        )
    return value


def _per_axis(value: Any, k: int, name: str, kinds: tuple[type, ...]) -> tuple:
    if value is None or isinstance(value, kinds):
        return (value,) * k
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != k:
            raise ValueError(
                f"Conservation.integral: {name} must be one value or one per integrated axis "
                f"({k}), got {len(value)}."
            )
        return tuple(value)
    raise TypeError(
        f"Conservation.integral: {name} must be one value or a sequence with one per integrated "
        f"axis, got {type(value).__name__}."
    )


class IntegralConservation(Conservation):
    """The quadrature of a grid output over some spatial axes equals a given total.

    On a channel-first output ``(batch, channels, d1, ..., dn)`` there is one row per channel (of
    ``channels``) and per index of the remaining spatial axes (e.g. per time frame):
    ``sum_i w_i u[b, c, ..., i, ...] = total[b, c, ...]``.

    Parameters
    ----------
    total : float, Tensor or callable, default 0.0
        The integral: a number; a tensor broadcastable to ``(batch, channels, *remaining axes)``
        (e.g. shape (T,) for one value per time frame); or a callable of the model input returning
        one. :func:`mass_over_time` builds it from an initial mass and boundary fluxes.
    dim : int or sequence of int, default 0
        The spatial axes integrated over (0 is the first axis after the channels); several axes
        give tensor-product weights.
    rule : str or sequence of str, default "trapezoid"
        ``"trapezoid"``, ``"simpson"`` or ``"right"`` (see :mod:`constraint_layers.quadrature`),
        per axis.
    spacing : float or sequence, optional
        Fixed spacing per integrated axis. Exclusive with ``extent`` and ``grid``.
    extent : float or sequence, optional
        Domain length per integrated axis (default 1): the spacing is ``extent / (N - 1)`` (or
        ``extent / N`` with ``endpoint=False``), recomputed from each output's size.
    grid : Tensor or sequence of Tensor, optional
        Sorted node coordinates per integrated axis (non-uniform grids); shape (N,).
    endpoint : bool, default True
        ``False``: periodic grids without the end node (trapezoid weights all equal the spacing).
    channels : int or sequence of int, optional
        The output channels constrained (default: all, each its own rows).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> c = cl.Conservation.integral(torch.tensor([1.0, 2.0]), dim=0, rule="simpson")
    >>> w = c.rows((1, 1, 5, 2)).coeff[0]  # Simpson weights on 5 nodes of [0, 1]: (1 4 2 4 1) / 12
    >>> (w * 12).round(decimals=12).tolist()
    [1.0, 4.0, 2.0, 4.0, 1.0]
    """

    #: The structure tag the engine's dispatcher reads: disjoint rows, one per frame (streamed).
    structure: ClassVar[str] = "frame"

    def __init__(
        self,
        total: Total = 0.0,
        *,
        dim: int | Sequence[int] = 0,
        rule: str | Sequence[str] = "trapezoid",
        spacing: float | Sequence[float] | None = None,
        extent: float | Sequence[float] | None = None,
        grid: Tensor | Sequence[Tensor | None] | None = None,
        endpoint: bool = True,
        channels: int | Sequence[int] | None = None,
    ) -> None:
        name = "Conservation.integral"
        dims = (dim,) if not isinstance(dim, Sequence) or isinstance(dim, str) else tuple(dim)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
            raise TypeError(f"{name}: dim must be an int or a sequence of ints, got {dim!r}.")
        if len(set(dims)) != len(dims):
            raise ValueError(f"{name}: dim holds duplicates: {dims}.")
        k = len(dims)
        self.dims = dims
        self.rule = _per_axis(rule, k, "rule", (str,))
        for r in self.rule:
            if r not in RULES:
                raise ValueError(f"{name}: rule must be one of {list(RULES)}, got {r!r}.")
        self.spacing = _per_axis(spacing, k, "spacing", (int, float))
        self.extent = _per_axis(extent, k, "extent", (int, float))
        self.grid = _per_axis(grid, k, "grid", (Tensor,))
        for i in range(k):
            given = [x is not None for x in (self.spacing[i], self.extent[i], self.grid[i])]
            if sum(given) > 1:
                raise ValueError(
                    f"{name}: give at most one of spacing=, extent= and grid= per axis."
                )
            for v, what in ((self.spacing[i], "spacing"), (self.extent[i], "extent")):
                if v is not None and not (math.isfinite(v) and v > 0):
                    raise ValueError(f"{name}: {what} must be finite and positive, got {v}.")
            if self.grid[i] is not None:
                quadrature_weights(self.grid[i], self.rule[i])  # sorted, long enough
        self.endpoint = bool(endpoint)
        if channels is not None:
            channels = (channels,) if isinstance(channels, int) else tuple(int(c) for c in channels)
            if not channels or len(set(channels)) != len(channels):
                raise ValueError(
                    f"{name}: channels must be non-empty and distinct, got {channels}."
                )
        self.channels = channels
        self.single = False
        self.b = _real(check_value(total, name, "right-hand side"), name)

    @property
    def total(self) -> Total:
        return self.b

    @property
    def num_rows(self) -> int | None:
        return None

    # ------------------------------------------------------------------------ geometry
    def layout(self, shape: Sequence[int], call: str = "Conservation.integral") -> _Layout:
        """Where the rows sit in an output of ``shape`` = (batch, channels, d1, ..., dn)."""
        shape = tuple(int(s) for s in shape)
        if len(shape) < 3:
            raise GridError(
                f"{call}: {self!r} needs a channel-first grid output (batch, channels, d1, ..., "
                f"dn), got shape {shape}. For a flat output (a GP on a grid of test points) give "
                "ConservationProjection(..., grid_shape=(d1, ..., dn))."
            )
        n_spatial = len(shape) - 2
        dims = tuple(normalize_dim(d, n_spatial, f"{call}: {self!r}") for d in self.dims)
        if len(set(dims)) != len(dims):
            raise GridError(f"{call}: {self!r}: dim names the same axis twice ({dims}).")
        chans = None
        if self.channels is not None:
            c = shape[1]
            bad = [i for i in self.channels if not -c <= i < c]
            if bad:
                raise GridError(
                    f"{call}: {self!r}: channels {bad} out of range for an output with {c} "
                    "channel(s)."
                )
            chans = tuple(i % c for i in self.channels)
        rest = tuple(i for i in range(n_spatial) if i not in dims)
        return _Layout(shape, dims, rest, chans)

    def weights(
        self, sizes: Sequence[int], *, dtype: torch.dtype = F64, device: Any = None
    ) -> Tensor:
        """Tensor-product quadrature weights for the integrated axes of the given sizes.

        Returns
        -------
        Tensor
            shape: (n_1, ..., n_k), one size per integrated axis (in the order of ``dim``).
        """
        ws = []
        for i, n in enumerate(sizes):
            g = self.grid[i]
            if g is not None and g.shape[0] != n:
                raise GridError(
                    f"Conservation.integral.weights: {self!r}: the grid of integrated axis "
                    f"{self.dims[i]} has "
                    f"{g.shape[0]} nodes, but the output has {n} along it."
                )
            ws.append(
                quadrature_weights(
                    g if g is not None else n,
                    self.rule[i],
                    spacing=self.spacing[i],
                    extent=self.extent[i],
                    endpoint=self.endpoint,
                    dtype=dtype,
                    device=device,
                )
            )
        return tensor_product(*ws)

    def _totals(self, lay: _Layout, inputs: Any, call: str) -> Tensor:
        """The total per row, float64: shape (batch, channels', *remaining axes)."""
        value = _real(evaluate_value(self.b, inputs, f"{call}: {self!r}", "right-hand side"),
                      f"{call}: {self!r}")  # fmt: skip
        t = torch.as_tensor(value, dtype=F64) if not isinstance(value, Tensor) else value.to(F64)
        try:
            return torch.broadcast_to(t, lay.row_shape)
        except RuntimeError:
            raise GridError(
                f"{call}: {self!r}: total of shape {tuple(t.shape)} does not broadcast to the "
                f"rows' shape {lay.row_shape} = (batch, channels, *remaining axes). Give one "
                "value per row, broadcastable from the right "
                f"({shape_hint(tuple(lay.row_shape), 'remaining axes (e.g. time frames)')})."
            ) from None

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> Rows:
        """The rows ``C u = d`` for a grid output of ``shape`` = (batch, channels, d1, ..., dn).

        ``grid`` is accepted for the common constraint protocol; the integral's own ``spacing``,
        ``extent`` and ``grid`` describe its axes.

        Returns
        -------
        Rows
            ``index`` and ``coeff`` (M, K) with ``M = channels' * prod(remaining axes)`` rows of
            ``K = prod(integrated axes)`` entries, ``rhs`` (batch, M).
        """
        call = "Conservation.integral.rows"
        lay = self.layout(shape, call)
        ids = torch.arange(math.prod(shape[1:])).reshape(shape[1:])
        index = lay.to_rows(ids.unsqueeze(0))[0]  # (C', *rest, K)
        w = self.weights(lay.sizes)
        m = math.prod(index.shape[:-1])
        coeff = w.flatten().expand(m, -1)
        rhs = self._totals(lay, inputs, call).reshape(shape[0], m)
        return Rows(index.reshape(m, -1), coeff, rhs)

    def residual(self, y: Tensor, *, inputs: Any = None) -> Tensor:
        lay = self.layout(y.shape, "Conservation.residual")
        w = self.weights(lay.sizes, device=y.device).flatten()
        u = lay.to_rows(y).to(F64)  # (B, C', *rest, K)
        res = (u * w).sum(-1) - self._totals(lay, inputs, "Conservation.residual").to(y.device)
        return res.reshape(y.shape[0], -1)

    def __repr__(self) -> str:
        b = shown_value(self, "b")
        if isinstance(b, Tensor):
            b = f"tensor{tuple(b.shape)}"
        elif callable(b):
            b = getattr(b, "__name__", "callable")
        parts = [f"{b}", f"dim={self.dims[0] if len(self.dims) == 1 else self.dims}"]
        if len(set(self.rule)) == 1:
            parts.append(f"rule={self.rule[0]!r}")
        else:
            parts.append(f"rule={self.rule}")
        if self.channels is not None:
            parts.append(f"channels={list(self.channels)}")
        return f"Conservation.integral({', '.join(parts)})"


class _Layout(NamedTuple):
    shape: tuple[int, ...]  # (batch, C, d1, ..., dn)
    dims: tuple[int, ...]  # integrated spatial axes
    rest: tuple[int, ...]  # the other spatial axes
    channels: tuple[int, ...] | None

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(self.shape[2 + d] for d in self.dims)

    @property
    def row_shape(self) -> tuple[int, ...]:
        c = self.shape[1] if self.channels is None else len(self.channels)
        return (self.shape[0], c, *(self.shape[2 + d] for d in self.rest))

    def to_rows(self, y: Tensor) -> Tensor:
        """(B, C, d1..dn) -> (B, C', *rest, K): the integrated axes last, flattened."""
        if self.channels is not None:
            y = y[:, list(self.channels)]
        order = [0, 1, *(2 + d for d in self.rest), *(2 + d for d in self.dims)]
        y = y.permute(order)
        return y.reshape(*y.shape[: 2 + len(self.rest)], -1)

    def from_rows(self, z: Tensor, like: Tensor) -> Tensor:
        """Inverse of :meth:`to_rows`, writing into a copy of ``like`` where channels select."""
        sizes = self.sizes
        z = z.reshape(*z.shape[:-1], *sizes)
        order = [0, 1, *(2 + d for d in self.rest), *(2 + d for d in self.dims)]
        inv = [0] * len(order)
        for i, o in enumerate(order):
            inv[o] = i
        z = z.permute(inv)
        if self.channels is None:
            return z
        idx = torch.tensor(self.channels, device=like.device)
        return like.index_copy(1, idx, z.to(like.dtype))


def conservation_rows(
    shape: Sequence[int],
    constraints: Conservation | Sequence[Conservation],
    *,
    inputs: Any = None,
) -> list[Rows]:
    """The rows ``C u = d`` each conservation constraint states for an output of ``shape``.

    The structured form every constraint of the library shares (compare
    :func:`constraint_layers.functional.boundary_rows`).

    Examples
    --------
    >>> import constraint_layers as cl
    >>> rows = cl.functional.conservation_rows((2, 1, 11, 3), cl.Conservation.integral(1.0))
    >>> rows[0].index.shape, rows[0].rhs.shape
    (torch.Size([3, 11]), torch.Size([2, 3]))
    """
    return [c.rows(shape, inputs=inputs) for c in constraints_of(constraints, "conservation_rows")]


def constraints_of(items: object, call: str) -> tuple[Conservation, ...]:
    if isinstance(items, Conservation):
        items = (items,)
    if not isinstance(items, Sequence):
        raise TypeError(
            f"{call}: expected a cl.Conservation or a sequence of them, got {type(items).__name__}."
        )
    items = tuple(items)
    for c in items:
        if not isinstance(c, Conservation):
            raise TypeError(
                f"{call}: expected conservation constraints (cl.Conservation, "
                f"cl.Conservation.integral), got {type(c).__name__}."
            )
    if not items:
        raise ValueError(f"{call}: expected at least one conservation constraint, got none.")
    return items


def mass_over_time(
    initial: float | Tensor,
    inflow: float | Tensor | Sequence[Tensor] = 0.0,
    *,
    t: Tensor | None = None,
    dt: float | None = None,
    num_times: int | None = None,
    dim: int = -1,
) -> Tensor:
    """The total mass over time from the initial mass and the boundary fluxes.

    ``U(t_k) = U(t_0) + integral_{t_0}^{t_k} (net inflow) dt`` with the cumulative trapezoid rule:
    how the right-hand side ``b(t)`` of an integral constraint is known on open domains.

    Parameters
    ----------
    initial : float or Tensor
        ``U(t_0)``; a tensor broadcasts against ``inflow`` with ``dim`` removed (e.g. shape
        (batch,) for an inflow of shape (batch, T)).
    inflow : float, Tensor or sequence of Tensor
        The net rate at which mass enters through the boundary (inward fluxes summed over the
        faces; outflow counts negative), sampled at the times: shape (..., T) (along ``dim``). A
        sequence (one tensor per face) is summed. A number is a constant rate (give ``t`` or
        ``num_times``).
    t : Tensor, optional
        shape: (T,); sorted times (non-uniform allowed). Exclusive with ``dt``.
    dt : float, optional
        Uniform time step (default 1 when ``t`` is not given).
    num_times : int, optional
        Number of times, for a constant ``inflow`` without ``t``.
    dim : int, default -1
        The time axis of ``inflow``.

    Returns
    -------
    Tensor
        shape: (..., T): ``U`` at each time, ``U[..., 0] = initial``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> t = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> cl.mass_over_time(0.5, torch.full((5,), 0.4, dtype=torch.float64), t=t).tolist()
    [0.5, 0.6, 0.7, 0.8, 0.9]
    """
    if isinstance(inflow, Sequence) and not isinstance(inflow, (str, Tensor)):
        if not inflow:
            raise ValueError("mass_over_time: inflow is an empty sequence.")
        parts = [torch.as_tensor(f) for f in inflow]
        inflow = parts[0]
        for p in parts[1:]:
            inflow = inflow + p
    if not isinstance(inflow, Tensor):
        if isinstance(inflow, bool) or not isinstance(inflow, Real):
            raise TypeError(
                f"mass_over_time: inflow must be a number or a tensor, got {type(inflow).__name__}."
            )
        n = t.shape[0] if t is not None else num_times
        if n is None:
            raise ValueError(
                "mass_over_time: a constant inflow needs the times: give t= or num_times=."
            )
        dtype = t.dtype if t is not None and t.is_floating_point() else torch.get_default_dtype()
        inflow = torch.full((n,), float(inflow), dtype=dtype)
    if t is not None and dt is not None:
        raise ValueError("mass_over_time: give either t= or dt=, not both.")
    return cumulative_trapezoid(inflow, t, spacing=dt, dim=dim, initial=initial)
