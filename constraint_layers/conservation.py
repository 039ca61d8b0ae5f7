"""Conservation constraints, and the layer that makes a probabilistic model respect them exactly.

A conservation law ``u_t + div F(u) = 0`` has the integral form ``d/dt U(t) = net inflow``, with
``U(t)`` the integral of ``u(t, .)`` over the domain. Discretised with a quadrature rule on the
output grid, "the total at time t equals b(t)" is a LINEAR constraint on the predicted values:
``G u = b``, one row per time frame. :class:`Conservation` states such constraints
(:meth:`Conservation.integral` builds them from a quadrature rule); :class:`ConservationProjection`
wraps a model so that every output satisfies them (ProbConserv, Hansen et al., ICML 2023):

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
from torch import Tensor, nn

from . import quadrature
from ._conservation_ops import ConstrainedGaussian, Gaussian, conserve
from ._grid import normalize_dim
from ._values import bind_given, check_value, evaluate_value
from ._wrapper import TOLERANCE, ConstraintLayer, check_normalizer, current_normalizer
from .errors import ConstraintViolationError, GridError

__all__ = [
    "Conservation",
    "ConservationProjection",
    "ConservationRows",
    "IntegralConservation",
    "conservation_rows",
    "enforce_conservation",
    "mass_over_time",
]

F64 = torch.float64
Total = float | Tensor | Callable[[Any], Any]


class ConservationRows(NamedTuple):
    """Rows of ``C u = d`` of one conservation constraint over the flattened per-sample output.

    ``u`` is one sample flattened in C order over its event axes (``(channels, d1, ..., dn)`` for
    grid outputs).
    """

    index: Tensor  # shape: (M, K), long: the flat positions each row reads
    coeff: Tensor  # shape: (M, K) or (batch, M, K), float64: their coefficients
    rhs: Tensor  # shape: (batch, M), float64: the right-hand sides d

    def dense(self, size: int) -> Tensor:
        """The dense float64 matrix ``C``: shape (M, size), or (batch, M, size) per sample."""
        m = self.index.shape[0]
        lead = self.coeff.shape[:-2]
        c = torch.zeros((*lead, m, size), dtype=F64, device=self.coeff.device)
        return c.scatter_add_(-1, self.index.expand(*lead, *self.index.shape), self.coeff)


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

    #: Which layer enforces the constraint (``cl.wrap`` dispatches on it).
    family: ClassVar[str] = "conservation"

    kind = "conservation"

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
        if not bool(torch.isfinite(G.detach()).all()):
            raise ValueError(f"{name}: G holds NaN or inf.")
        self.single = G.ndim == 1
        self.G = (G.unsqueeze(0) if self.single else G).to(
            G.dtype if G.is_floating_point() else F64
        )
        self.b = check_value(b, name, "right-hand side")

    @property
    def num_rows(self) -> int | None:
        """Rows per sample (None when it depends on the output shape)."""
        return int(self.G.shape[-2])

    # --------------------------------------------------------------------------- rows
    def _rhs(self, batch: int, m: int, inputs: Any, call: str) -> Tensor:
        value = evaluate_value(self.b, inputs, f"{call}: {self!r}", "right-hand side")
        b = torch.as_tensor(value, dtype=F64)
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

    def rows(self, shape: Sequence[int], *, inputs: Any = None) -> ConservationRows:
        """The rows ``C u = d`` for an output of ``shape`` = (batch, *event).

        Returns
        -------
        ConservationRows
            ``index`` (M, N), ``coeff`` (M, N) or (batch, M, N), ``rhs`` (batch, M).
        """
        call = "Conservation.rows"
        batch, n = int(shape[0]), math.prod(shape[1:])
        self._check_size(n, batch, call)
        m = self.G.shape[-2]
        index = torch.arange(n, device=self.G.device).expand(m, n)
        return ConservationRows(index, self.G.to(F64), self._rhs(batch, m, inputs, call))

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
    ) -> IntegralConservation:
        """The integral of a grid output over spatial axes ``dim`` equals ``total``.

        See :class:`IntegralConservation` for the parameters.

        Examples
        --------
        >>> import torch, constraint_layers as cl
        >>> c = cl.Conservation.integral(0.0, dim=0)  # per frame of a (batch, 1, x, t) output
        >>> y = cl.functional.enforce_conservation(torch.randn(2, 1, 33, 5), c).mean
        >>> float(cl.metrics.conservation_error(y, c).abs().max()) < 1e-6
        True
        """
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
        b = self.b
        if isinstance(b, Tensor):
            b = f"tensor{tuple(b.shape)}"
        elif callable(b):
            b = getattr(b, "__name__", "callable")
        return f"Conservation(G: {tuple(self.G.shape)}, b={b})"


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
        dims = (dim,) if isinstance(dim, int) else tuple(dim)
        if not dims or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
            raise TypeError(f"{name}: dim must be an int or a sequence of ints, got {dim!r}.")
        if len(set(dims)) != len(dims):
            raise ValueError(f"{name}: dim holds duplicates: {dims}.")
        k = len(dims)
        self.dims = dims
        self.rule = _per_axis(rule, k, "rule", (str,))
        for r in self.rule:
            if r not in quadrature.RULES:
                raise ValueError(
                    f"{name}: rule must be one of {list(quadrature.RULES)}, got {r!r}."
                )
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
                quadrature.weights(self.grid[i], self.rule[i])  # sorted, long enough
        self.endpoint = bool(endpoint)
        if channels is not None:
            channels = (channels,) if isinstance(channels, int) else tuple(int(c) for c in channels)
            if not channels or len(set(channels)) != len(channels):
                raise ValueError(
                    f"{name}: channels must be non-empty and distinct, got {channels}."
                )
        self.channels = channels
        self.single = False
        self.b = check_value(total, name, "right-hand side")

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
                    f"Conservation.integral: the grid of integrated axis {self.dims[i]} has "
                    f"{g.shape[0]} nodes, but the output has {n} along it."
                )
            ws.append(
                quadrature.weights(
                    g if g is not None else n,
                    self.rule[i],
                    spacing=self.spacing[i],
                    extent=self.extent[i],
                    endpoint=self.endpoint,
                    dtype=dtype,
                    device=device,
                )
            )
        return quadrature.tensor_product(*ws)

    def _totals(self, lay: _Layout, inputs: Any, call: str) -> Tensor:
        """The total per row, float64: shape (batch, channels', *remaining axes)."""
        value = evaluate_value(self.b, inputs, f"{call}: {self!r}", "right-hand side")
        t = torch.as_tensor(value, dtype=F64) if not isinstance(value, Tensor) else value.to(F64)
        try:
            return torch.broadcast_to(t, lay.row_shape)
        except RuntimeError:
            raise GridError(
                f"{call}: {self!r}: total of shape {tuple(t.shape)} does not broadcast to the "
                f"rows' shape {lay.row_shape} = (batch, channels, *remaining axes). Give one "
                "value per row, broadcastable from the right (e.g. shape (T,) for one value per "
                "time frame, (batch, 1, 1) for one value per sample)."
            ) from None

    def rows(self, shape: Sequence[int], *, inputs: Any = None) -> ConservationRows:
        """The rows ``C u = d`` for a grid output of ``shape`` = (batch, channels, d1, ..., dn).

        Returns
        -------
        ConservationRows
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
        return ConservationRows(index.reshape(m, -1), coeff, rhs)

    def residual(self, y: Tensor, *, inputs: Any = None) -> Tensor:
        lay = self.layout(y.shape, "Conservation.residual")
        w = self.weights(lay.sizes, device=y.device).flatten()
        u = lay.to_rows(y).to(F64)  # (B, C', *rest, K)
        res = (u * w).sum(-1) - self._totals(lay, inputs, "Conservation.residual").to(y.device)
        return res.reshape(y.shape[0], -1)

    def __repr__(self) -> str:
        b = self.b
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
) -> list[ConservationRows]:
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
    return [c.rows(shape, inputs=inputs) for c in _constraints(constraints, "conservation_rows")]


def _constraints(items: object, call: str) -> tuple[Conservation, ...]:
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
    return quadrature.cumulative_trapezoid(inflow, t, spacing=dt, dim=dim, initial=initial)


# ------------------------------------------------------------------------ the functional
_METRICS = ("covariance", "euclidean")


def _flat_event(x: Tensor | None, event_ndim: int) -> Tensor | None:
    return None if x is None else x.reshape(*x.shape[: x.ndim - event_ndim], -1)


def _grid_view(mean: Tensor, event_ndim: int, grid_shape, call: str) -> tuple[int, ...]:
    """The (batch, channels, d1, ..., dn) shape the constraint rows are stated on."""
    k = event_ndim
    if not 1 <= k <= mean.ndim:
        raise ValueError(
            f"{call}: event_ndim must be between 1 and mean.ndim = {mean.ndim}, got {k}."
        )
    batch = math.prod(mean.shape[: mean.ndim - k])
    event = tuple(mean.shape[mean.ndim - k :])
    if k == 1:
        n = event[0]
        grid = tuple(grid_shape) if grid_shape is not None else (n,)
        if math.prod(grid) != n:
            raise GridError(
                f"{call}: grid_shape={grid} holds {math.prod(grid)} points, but the output has "
                f"{n} per sample."
            )
        return (batch, 1, *grid)
    if grid_shape is not None and len(event) == 2 and math.prod(grid_shape) == event[1]:
        return (batch, event[0], *grid_shape)  # channels of flat points (multitask GPs)
    if grid_shape is not None and tuple(grid_shape) != event[1:]:
        raise GridError(
            f"{call}: grid_shape={tuple(grid_shape)} does not match the output's grid "
            f"{event[1:]} (event shape {event} = (channels, d1, ..., dn))."
        )
    return (batch, *event)


def enforce_conservation(
    mean: Tensor,
    constraints: Conservation | Sequence[Conservation],
    *,
    variance: Tensor | None = None,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    noise: float | Tensor = 0.0,
    metric: str = "covariance",
    event_ndim: int | None = None,
    grid_shape: Sequence[int] | None = None,
    inputs: Any = None,
) -> Gaussian:
    """Make a (Gaussian or deterministic) model output satisfy conservation constraints.

    The functional behind :class:`ConservationProjection`: the constraints' rows are stated on
    the output's layout and :func:`~constraint_layers.functional.conserve` conditions the
    Gaussian on them (or projects a deterministic output orthogonally). A single integral
    constraint on a diagonal (or no) covariance runs as independent single-row updates, one per
    frame (O(N) time and memory).

    Parameters
    ----------
    mean : Tensor
        shape: (*batch, *event). Grid outputs: event = (channels, d1, ..., dn). Flat outputs
        (``event_ndim=1``): event = (N,), read as one channel on ``grid_shape``.
    constraints : Conservation or sequence of them
        Enforced jointly.
    variance : Tensor, optional
        shape: like ``mean`` (broadcastable). Marginal variances (the diagonal part when
        ``low_rank`` is given).
    covariance : Tensor or linear operator, optional
        shape: (*batch, N, N) over the flattened event.
    low_rank : Tensor, optional
        shape: (*batch, N, K).
    noise, metric
        As for :func:`~constraint_layers.functional.conserve`.
    event_ndim : int, optional
        Number of trailing event axes (default: all but the first axis, i.e. a (batch, ...)
        output).
    grid_shape : sequence of int, optional
        The grid of a flat event (``event_ndim=1``).
    inputs : any, optional
        The model input, passed to callable right-hand sides.

    Returns
    -------
    Gaussian
        ``mean`` and ``variance`` (marginal) in the input's layout and dtype; with a full
        ``covariance``, ``downdate`` ``F`` (shape (*batch, N, M)): the posterior covariance is
        ``covariance - F F^T``.

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> c = cl.Conservation.integral(0.0, dim=0)  # a (batch, 1, x, t) output, zero mass per t
    >>> out = cl.functional.enforce_conservation(torch.randn(2, 1, 33, 5), c)
    >>> float(cl.metrics.conservation_error(out.mean, c).abs().max()) < 1e-6
    True
    """
    call = "enforce_conservation"
    cons = _constraints(constraints, call)
    if metric not in _METRICS:
        raise ValueError(f"{call}: metric must be one of {_METRICS}, got {metric!r}.")
    if not isinstance(mean, Tensor):
        raise TypeError(f"{call}: mean must be a tensor, got {type(mean).__name__}.")
    k = max(mean.ndim - 1, 1) if event_ndim is None else int(event_ndim)
    shape = _grid_view(mean, k, grid_shape, call)
    lead = mean.shape[: mean.ndim - k]
    if variance is not None and isinstance(variance, Tensor) and variance.shape != mean.shape:
        try:
            variance = torch.broadcast_to(variance, mean.shape)
        except RuntimeError:
            raise ValueError(
                f"{call}: variance of shape {tuple(variance.shape)} does not broadcast to the "
                f"mean's shape {tuple(mean.shape)}."
            ) from None
    structured = covariance is None and low_rank is None
    if len(cons) == 1 and isinstance(cons[0], IntegralConservation) and structured:
        return _enforce_integral(mean, variance, cons[0], shape, k, noise, metric, inputs, call)
    post = _posterior(
        mean, variance, covariance, low_rank, cons, shape, lead, k, noise, metric, inputs
    )
    ev = mean.shape[mean.ndim - k :]
    var = None if post.variance is None else post.variance.reshape(*lead, *ev)
    down = None
    if covariance is not None and post.factor is not None:
        down = post.factor.to(post.mean.dtype)
    return Gaussian(post.mean.reshape(*lead, *ev), var, covariance, None, down, k, post)


def _posterior(
    mean, variance, covariance, low_rank, cons, shape, lead, k, noise, metric, inputs
) -> ConstrainedGaussian:
    """The general path: every constraint's rows stacked, one ``conserve`` call."""
    n = math.prod(shape[1:])
    Gs, bs = [], []
    for con in cons:
        r = con.rows(shape, inputs=inputs)
        Gs.append(r.dense(n))
        bs.append(r.rhs)
    per_sample = any(x.ndim == 3 for x in Gs)
    if per_sample:
        Gs = [x if x.ndim == 3 else x.expand(shape[0], *x.shape) for x in Gs]
    G = torch.cat(Gs, dim=-2).to(mean.device)
    b = torch.cat(bs, dim=-1).to(mean.device)
    if per_sample:
        G = G.reshape(*lead, *G.shape[-2:])
    b = b.reshape(*lead, b.shape[-1])
    return conserve(
        _flat_event(mean, k),
        G,
        b,
        variance=_flat_event(variance, k),
        covariance=covariance,
        low_rank=low_rank,
        noise=noise,
        metric=metric,
    )


def _enforce_integral(mean, variance, con, shape, k, noise, metric, inputs, call) -> Gaussian:
    """Integral rows on a diagonal (or no) covariance: independent single-row updates."""
    lay = con.layout(shape, call)
    grid = mean.reshape(shape)
    var_grid = None if variance is None else variance.reshape(shape)
    w = con.weights(lay.sizes, device=mean.device).reshape(1, -1)
    total = con._totals(lay, inputs, call).to(mean.device).unsqueeze(-1)
    post = conserve(
        lay.to_rows(grid),
        w,
        total,
        variance=None if var_grid is None else lay.to_rows(var_grid),
        noise=noise,
        metric=metric,
    )
    new_mean = lay.from_rows(post.mean, grid).reshape(mean.shape)
    new_var = None
    if var_grid is not None:
        new_var = lay.from_rows(post.variance, var_grid).reshape(mean.shape)
    return Gaussian(new_mean, new_var, None, None, None, k)


# ------------------------------------------------------------------------------ the layer
class ConservationProjection(ConstraintLayer):
    """Wrap a model so that its outputs satisfy conservation constraints exactly.

    ``forward`` is the model call followed by one update of its output (through the model's
    adapter): a Gaussian output is conditioned on ``G u = b`` (ProbConserv), a deterministic one is
    projected orthogonally (HardC); the output comes back as the same kind of object (a tensor, a
    ``(mean, variance)`` tuple, a dict, a ``torch.distributions.Normal``, a gpytorch
    ``MultivariateNormal``, ...). The wrapper trains, saves and loads like the model (its
    ``state_dict`` is the model's under the prefix ``model.``).

    Parameters
    ----------
    model : nn.Module
        The model; held as ``self.model``, not copied.
    constraints : Conservation or sequence of them
        Several constraints are enforced jointly (their rows stacked).
    noise : float or Tensor, default 0.0
        Constraint noise standard deviation (0: exact conservation).
    metric : {"covariance", "euclidean"}, default "covariance"
        ``"euclidean"`` moves the mean by the orthogonal projection and leaves the uncertainty as
        the model gave it (the HardC baseline). Deterministic outputs always use it.
    grid_shape : sequence of int, optional
        For flat outputs (a GP evaluated at grid points flattened in C order): the grid
        ``(d1, ..., dn)``, so that :meth:`Conservation.integral` can find its axes (the output is
        read as one channel).
    normalizer : object, optional
        The output normaliser of the training pipeline (``transform`` / ``inverse_transform``,
        elementwise affine) or an object holding it as ``out_normalizer``. The constraint is stated
        in physical units and enforced on ``inverse_transform(output)``; variances scale with the
        square of the normaliser's scale.
    adapter : Adapter, optional
        How to call the model and read its Gaussian; default: looked up in the adapter registry.
    debug : bool, default False
        Check the residual after every call and raise
        :class:`~constraint_layers.errors.ConstraintViolationError` beyond rounding.

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

    def __init__(
        self,
        model: nn.Module,
        constraints: Conservation | Sequence[Conservation],
        *,
        noise: float | Tensor = 0.0,
        metric: str = "covariance",
        grid_shape: Sequence[int] | None = None,
        normalizer: object = None,
        adapter: Any = None,
        debug: bool = False,
    ) -> None:
        call = "ConservationProjection"
        super().__init__(model, adapter)
        self.constraints = _constraints(constraints, call)
        if metric not in _METRICS:
            raise ValueError(f"{call}: metric must be one of {_METRICS}, got {metric!r}.")
        if isinstance(noise, bool) or not isinstance(noise, (int, float, Tensor)):
            raise TypeError(f"{call}: noise must be a number or a tensor, got {noise!r}.")
        if not isinstance(noise, Tensor) and not float(noise) >= 0:
            raise ValueError(f"{call}: noise must be non-negative, got {noise}.")
        self.noise = noise
        self.metric = metric
        if grid_shape is not None:
            grid_shape = tuple(int(s) for s in grid_shape)
            if not grid_shape or min(grid_shape) < 1:
                raise ValueError(f"{call}: grid_shape must hold positive sizes, got {grid_shape}.")
        self.grid_shape = grid_shape
        self.normalizer = check_normalizer(normalizer, call)
        self.debug = bool(debug)
        self._attach()

    def _bind(self, kwargs: dict) -> tuple[Conservation, ...]:
        """The constraints of this call: ``cl.Given`` right-hand sides taken out of ``kwargs``."""
        return bind_given(
            self.constraints, "b", kwargs, "ConservationProjection", "right-hand side"
        )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = dict(kwargs)
        constraints = self._bind(kwargs)
        out = self.adapter.call(self.model, args, kwargs)
        inputs = self.adapter.model_input(args, kwargs)
        return self.adapter.constrain(out, lambda g: self.project(g, inputs, constraints))

    def project(
        self, g: Gaussian, inputs: Any = None, constraints: Sequence[Conservation] | None = None
    ) -> Gaussian:
        """Condition (or project) one Gaussian output record; returns the posterior record.

        ``g`` as the adapter reads it (:class:`~constraint_layers.functional.Gaussian`); the
        result has the same layout (see :func:`enforce_conservation`). ``constraints``: default,
        this layer's.
        """
        constraints = self.constraints if constraints is None else constraints
        norm = current_normalizer(self.normalizer)
        scale = None
        if norm is not None:
            g, scale = _to_physical(g, norm)
        post = enforce_conservation(
            g.mean,
            constraints,
            variance=g.variance,
            covariance=g.covariance,
            low_rank=g.low_rank,
            noise=self.noise,
            metric=self.metric,
            event_ndim=g.event_ndim,
            grid_shape=self.grid_shape,
            inputs=inputs,
        )
        if self.debug:
            self._check(post, inputs, constraints)
        if norm is not None:
            post = _from_physical(post, norm, scale)
        return post

    def posterior(self, *args: Any, **kwargs: Any) -> ConstrainedGaussian:
        """The structured posterior of the model's output for these inputs (flattened event).

        For sampling (e.g. shock positions): ``layer.posterior(x).sample(500)``. The model's
        Gaussian as its adapter reads it (for an ensemble: its moment-matched Gaussian); in
        physical units when a normaliser is set.

        Returns
        -------
        ConstrainedGaussian
            ``mean`` of shape (*batch, N), N the flattened event.
        """
        kwargs = dict(kwargs)
        constraints = self._bind(kwargs)
        out = self.adapter.call(self.model, args, kwargs)
        g = self.adapter.gaussian(out)
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = _to_physical(g, norm)
        k = g.event_ndim
        shape = _grid_view(g.mean, k, self.grid_shape, "ConservationProjection.posterior")
        lead = g.mean.shape[: g.mean.ndim - k]
        return _posterior(
            g.mean, g.variance, g.covariance, g.low_rank, constraints, shape, lead, k,
            self.noise, self.metric, self.adapter.model_input(args, kwargs),
        )  # fmt: skip

    def residual(self, output: Any, inputs: Any = None, **given: Any) -> Tensor:
        """Signed residual ``G mean - b`` of a model output (physical units); shape (batch, M)
        with all constraints' rows concatenated, float64. ``given``: values of ``cl.Given``
        right-hand sides."""
        constraints = self._bind(dict(given))
        g = self.adapter.gaussian(output)
        norm = current_normalizer(self.normalizer)
        if norm is not None:
            g, _ = _to_physical(g, norm)
        return self._residual(g, inputs, constraints)

    def _residual(self, g: Gaussian, inputs: Any, constraints: Sequence[Conservation]) -> Tensor:
        shape = _grid_view(g.mean, g.event_ndim, self.grid_shape, "ConservationProjection")
        y = g.mean.reshape(shape)
        return torch.cat([c.residual(y, inputs=inputs) for c in constraints], dim=-1)

    def _check(self, post: Gaussian, inputs: Any, constraints: Sequence[Conservation]) -> None:
        res = self._residual(post, inputs, constraints).detach()
        tol = TOLERANCE.get(post.mean.dtype, 1e-4)
        scale = float(post.mean.detach().abs().max()) + 1.0
        worst = float(res.abs().max()) if res.numel() else 0.0
        if not worst <= tol * scale:
            raise ConstraintViolationError(
                f"ConservationProjection(debug=True): residual {worst:.3e} after the update "
                f"(tolerance {tol * scale:.3e} for {post.mean.dtype}). This is a bug: please "
                "report it with the constraints and the output shape."
            )

    def extra_repr(self) -> str:
        opts = [f"constraints={list(self.constraints)}", f"metric={self.metric!r}"]
        if not (isinstance(self.noise, (int, float)) and self.noise == 0):
            opts.append(f"noise={self.noise}")
        if self.grid_shape is not None:
            opts.append(f"grid_shape={self.grid_shape}")
        return ", ".join(opts)


# ------------------------------------------------------------------------ normalisation
def _scale(norm: Any, like: Tensor) -> Tensor:
    """The elementwise scale of an affine ``inverse_transform``: ``inv(1) - inv(0)``."""
    return norm.inverse_transform(torch.ones_like(like)) - norm.inverse_transform(
        torch.zeros_like(like)
    )


def _to_physical(g: Gaussian, norm: Any) -> tuple[Gaussian, Tensor]:
    s = _scale(norm, g.mean)
    mean = norm.inverse_transform(g.mean)
    var = None if g.variance is None else g.variance * s.square()
    sf = _flat_event(s, g.event_ndim)
    cov, low = g.covariance, g.low_rank
    if cov is not None:
        cov = cov * (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if low is not None:
        low = low * sf.unsqueeze(-1)
    return g._replace(mean=mean, variance=var, covariance=cov, low_rank=low), s


def _from_physical(post: Gaussian, norm: Any, s: Tensor) -> Gaussian:
    mean = norm.transform(post.mean)
    var = None if post.variance is None else post.variance / s.square()
    sf = _flat_event(s, post.event_ndim)
    cov, down = post.covariance, post.downdate
    if cov is not None:
        cov = cov / (sf.unsqueeze(-1) * sf.unsqueeze(-2))
    if down is not None:
        down = down / sf.unsqueeze(-1)
    # The structured posterior is in physical units: adapters fall back to the record's fields.
    return post._replace(mean=mean, variance=var, covariance=cov, downdate=down, conditioned=None)
