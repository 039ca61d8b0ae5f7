"""Box bounds on a model's output: ``lower <= u <= upper``, composable with equality rows.

Densities, concentrations and saturations are non-negative, temperatures and fractions are
bounded above. :class:`Bounds` states such limits; the engine (:mod:`constraint_layers._engine`,
with the bounded step of :mod:`constraint_layers._engine.bounded.joint`) returns the point closest
to the model's prediction in the model's own metric (Euclidean for deterministic outputs, the
covariance for Gaussian ones) that satisfies every equality row of the other constraints AND the
bounds. Without equality rows and with a diagonal (or no) metric that is the clip.

Bounds state no equality rows: :meth:`Bounds.rows` returns an empty set, so every tool that
stacks rows (residuals, references) sees them as inactive; :meth:`Bounds.resolve` gives the
limits on an output's grid.

Examples
--------
>>> import torch, constraint_layers as cl
>>> model = cl.wrap(torch.nn.Identity(), cl.Bounds(lower=0.0))
>>> model(torch.tensor([[[-1.0, 0.5, 2.0]]]))
tensor([[[0.0000, 0.5000, 2.0000]]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any, ClassVar

import torch
from torch import Tensor

from ._values import Given, evaluate_value, shown_value
from .errors import GridError
from .rows import DEFAULT_GRID, GridSpec, Rows

__all__ = ["Bounds", "bounds_of", "resolve_bounds"]

F64 = torch.float64
Limit = float | Tensor | Callable[[Any], Any] | Given | None
#: The uncertainty of a bounded Gaussian output (see :class:`Bounds`).
VARIANCES = ("rows", "active")


def _check_limit(value: object, name: str, call: str) -> Limit:
    """A bound given at construction: None, a number (not NaN; +-inf means none), a floating
    tensor without NaN (+-inf entries are unbounded), a callable of the model input, or Given."""
    if value is None or isinstance(value, Given):
        return value
    if isinstance(value, Real) and not isinstance(value, bool):
        v = float(value)
        if math.isnan(v):
            raise ValueError(f"{call}: {name} must be a number, got NaN (use None for no bound).")
        return v
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            value = value.to(torch.get_default_dtype())
        if not value.requires_grad and bool(torch.isnan(value).any()):
            raise ValueError(
                f"{call}: {name} holds NaN (first at index "
                f"{tuple(torch.isnan(value).nonzero()[0].tolist())}); a bound may be -inf / +inf, "
                "never NaN."
            )
        return value
    if callable(value):
        return value
    raise TypeError(
        f"{call}: {name} must be None, a number, a tensor broadcastable to the output "
        f"(batch, channels, d1, ..., dn), a callable of the model input or cl.Given; got "
        f"{type(value).__name__}."
    )


class Bounds:
    """Box bounds ``lower <= u <= upper`` on a model's output, enforced with the other constraints.

    Parameters
    ----------
    lower, upper : float, Tensor, callable or Given, optional
        The limits (None: none on that side): a number; a tensor broadcastable to the output
        ``(batch, channels, d1, ..., dn)`` (entries may be ``-inf`` / ``+inf``, never NaN; flat
        outputs: broadcastable to the output itself); a callable of the model input returning
        one; or :class:`~constraint_layers.Given` (a keyword argument of the wrapped model's
        call). At least one must be given.
    channels : int or sequence of int, optional
        The output channels bounded (default: all).
    variance : {"rows", "active"}, default "rows"
        The uncertainty of a Gaussian output. ``"rows"``: the posterior conditioned on the
        equality rows (what the layer returns without bounds), centred on the bounded mean.
        ``"active"``: also conditioned on the active bounds held as equalities (variance 0 where
        a bound is active, the free entries conditioned on the rows over the free set).

    Notes
    -----
    The constrained output minimises ``(v - u)^T W^{-1} (v - u)`` subject to the equality rows of
    the other constraints and the bounds, with ``W`` the Euclidean metric (deterministic outputs,
    ``metric="euclidean"``) or the model's covariance (Gaussian outputs). When the
    equality-only result already lies in the bounds it is returned unchanged (bit for bit). For
    Gaussian outputs the mean is that point (the mode of the conditioned Gaussian restricted to
    the box). The default uncertainty (``variance="rows"``) is the one measured better
    calibrated on the conservation paper's PME and Stefan problems (LL and coverage of the 90%
    band on held-out truth; ``examples/conservation_paper/RESULTS.md``): ``"active"`` is certain
    at every active bound, and where the bounded mean sits on a bound the truth does not (a
    mean clamped to 0 behind a front), its likelihood collapses. Samples satisfy every row (and
    with ``"active"`` sit on the active bounds); they are Gaussian, not truncated: they may leave
    the bounds.
    With boundary conditions on a deterministic output, the bounds act on the values the
    boundary step leaves unchanged; the values it sets (walls, stencil pivots, a lift) are checked
    afterwards and a violation raises
    :class:`~constraint_layers.errors.IncompatibleConstraintsError` (a ``ConstraintError``).

    Examples
    --------
    >>> import torch, constraint_layers as cl
    >>> mass = cl.Conservation.integral(0.5)           # the integral over [0, 1] is 0.5
    >>> model = cl.wrap(torch.nn.Identity(), mass, cl.Bounds(lower=0.0))
    >>> y = model(torch.tensor([[[-0.2, 0.1, 0.4, 1.2, 0.3]]], dtype=torch.float64))
    >>> bool((y >= 0).all()), round(float(cl.metrics.conservation_error(y, mass).abs().max()), 12)
    (True, 0.0)

    References
    ----------
    Goldfarb, Idnani. A numerically stable dual method for solving strictly convex quadratic
    programs. Mathematical Programming 27, 1983.
    """

    #: Which step of the engine enforces the constraint.
    family: ClassVar[str] = "bounds"
    #: The structure tag the engine's dispatcher reads: box bounds, solved on top of the rows.
    structure: ClassVar[str] = "bounded"
    #: The attributes holding the constraint's values (``cl.Given`` binding).
    value_attr: ClassVar[tuple[str, str]] = ("lower", "upper")

    def __init__(
        self,
        lower: Limit = None,
        upper: Limit = None,
        *,
        channels: int | Sequence[int] | None = None,
        variance: str = "rows",
    ) -> None:
        call = "Bounds"
        if variance not in VARIANCES:
            raise ValueError(f"{call}: variance must be one of {VARIANCES}, got {variance!r}.")
        self.variance = variance
        self.lower = _check_limit(lower, "lower", call)
        self.upper = _check_limit(upper, "upper", call)
        if self.lower is None and self.upper is None:
            raise ValueError(
                f"{call}: give lower=, upper= or both (e.g. cl.Bounds(lower=0.0)); got neither."
            )
        lo, hi = self.lower, self.upper
        if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
            raise ValueError(f"{call}: lower must not exceed upper, got lower={lo} > upper={hi}.")
        if channels is not None:
            if isinstance(channels, int) and not isinstance(channels, bool):
                channels = (channels,)
            elif isinstance(channels, Sequence) and not isinstance(channels, str):
                channels = tuple(int(c) for c in channels)
            else:
                raise TypeError(
                    f"{call}: channels must be None, an int or a sequence of ints, got "
                    f"{type(channels).__name__}."
                )
            if not channels or len(set(channels)) != len(channels):
                raise ValueError(
                    f"{call}: channels must be non-empty and distinct, got {channels}."
                )
        self.channels = channels

    def rows(
        self, shape: Sequence[int], *, grid: GridSpec = DEFAULT_GRID, inputs: Any = None
    ) -> Rows:
        """No equality rows (bounds are inequalities): an empty set for the common protocol."""
        batch = int(shape[0])
        empty = torch.zeros((0, 1), dtype=torch.long)
        return Rows(empty, torch.zeros((0, 1), dtype=F64), torch.zeros((batch, 0), dtype=F64))

    def resolve(
        self,
        shape: Sequence[int],
        *,
        dtype: torch.dtype = F64,
        device: Any = None,
        inputs: Any = None,
        flat_shape: Sequence[int] | None = None,
        call: str = "Bounds.resolve",
    ) -> tuple[Tensor | None, Tensor | None]:
        """The limits on an output of grid ``shape`` = (batch, channels, d1, ..., dn).

        ``flat_shape``: the output's own shape when it is flat (a GP's points), which tensors may
        broadcast to instead. Returns ``(lower, upper)``, each None or a tensor of ``shape`` in
        ``dtype`` (rounded to it), ``-inf`` / ``+inf`` where unbounded (channels not selected).
        """
        shape = tuple(int(s) for s in shape)
        out = []
        for name in ("lower", "upper"):
            value = getattr(self, name)
            if value is None:
                out.append(None)
                continue
            where = f"{call}: {self!r}"
            v = evaluate_value(value, inputs, where, name)
            t = torch.as_tensor(v, dtype=F64, device=device) if not isinstance(v, Tensor) else v
            if not t.is_floating_point():
                raise TypeError(f"{where}: {name} must be floating point, got dtype {t.dtype}.")
            t = t.to(device=device, dtype=dtype)
            if bool(torch.isnan(t.detach()).any()):
                raise ValueError(f"{where}: {name} holds NaN; a bound may be -inf / +inf only.")
            t = self._broadcast(t, shape, flat_shape, where, name)
            if self.channels is not None:
                c = shape[1]
                bad = [i for i in self.channels if not -c <= i < c]
                if bad:
                    raise GridError(
                        f"{where}: channels {bad} out of range for an output with {c} channel(s)."
                    )
                keep = torch.zeros(c, dtype=torch.bool, device=t.device)
                keep[[i % c for i in self.channels]] = True
                keep = keep.reshape(1, c, *([1] * (len(shape) - 2)))
                fill = -math.inf if name == "lower" else math.inf
                t = torch.where(keep, t, torch.full_like(t, fill))
            out.append(t)
        lo, hi = out
        if lo is not None and hi is not None and bool((lo.detach() > hi.detach()).any()):
            idx = tuple((lo.detach() > hi.detach()).nonzero()[0].tolist())
            raise ValueError(
                f"{call}: {self!r}: lower must not exceed upper, but lower = {float(lo[idx])!r} > "
                f"upper = {float(hi[idx])!r} at index {idx} of the output {shape}."
            )
        return lo, hi

    @staticmethod
    def _broadcast(t: Tensor, shape, flat_shape, where: str, name: str) -> Tensor:
        for target, view in ((shape, None), (flat_shape, shape)):
            if target is None:
                continue
            try:
                b = torch.broadcast_to(t, tuple(target))
            except RuntimeError:
                continue
            return b if view is None else b.reshape(view)
        extra = "" if flat_shape is None else f" or the output's shape {tuple(flat_shape)}"
        raise GridError(
            f"{where}: {name} of shape {tuple(t.shape)} does not broadcast to the output grid "
            f"{tuple(shape)} = (batch, channels, d1, ..., dn){extra}. Give a number or a tensor "
            "broadcastable from the right (e.g. shape (X,) for one value per node of the last "
            "axis)."
        )

    def __repr__(self) -> str:
        parts = []
        for name in ("lower", "upper"):
            v = shown_value(self, name)
            if v is None:
                continue
            if isinstance(v, Tensor):
                v = f"tensor{tuple(v.shape)}"
            elif callable(v) and not isinstance(v, Given):
                v = getattr(v, "__name__", "callable")
            parts.append(f"{name}={v}")
        if self.channels is not None:
            parts.append(f"channels={list(self.channels)}")
        if self.variance != "rows":
            parts.append(f"variance={self.variance!r}")
        return f"Bounds({', '.join(parts)})"


def bounds_of(constraints: Sequence[Any]) -> list[Bounds]:
    """The :class:`Bounds` among ``constraints``, in the order given."""
    return [c for c in constraints if getattr(c, "family", None) == "bounds"]


def resolve_bounds(
    bounds: Sequence[Bounds],
    shape: Sequence[int],
    *,
    dtype: torch.dtype,
    device: Any,
    inputs: Any,
    flat_shape: Sequence[int] | None,
    call: str,
) -> tuple[Tensor | None, Tensor | None]:
    """Several :class:`Bounds` combined (the largest lower, the smallest upper): each None or a
    tensor of the grid ``shape`` (batch, channels, d1, ..., dn) in ``dtype``."""
    lo: Tensor | None = None
    hi: Tensor | None = None
    for b in bounds:
        lo_b, hi_b = b.resolve(
            shape, dtype=dtype, device=device, inputs=inputs, flat_shape=flat_shape, call=call
        )
        if lo_b is not None:
            lo = lo_b if lo is None else torch.maximum(lo, lo_b)
        if hi_b is not None:
            hi = hi_b if hi is None else torch.minimum(hi, hi_b)
    if lo is not None and hi is not None and bool((lo.detach() > hi.detach()).any()):
        idx = tuple((lo.detach() > hi.detach()).nonzero()[0].tolist())
        raise ValueError(
            f"{call}: the bounds {list(bounds)} leave no room at index {idx} of the output "
            f"{tuple(shape)}: largest lower {float(lo[idx])!r} > smallest upper "
            f"{float(hi[idx])!r}."
        )
    return lo, hi
