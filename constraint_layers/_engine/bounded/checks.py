"""Validation and error messages shared by the bounded solvers (private)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._tolerance import SEPARABLE_RTOL
from ...errors import ConstraintError

F64 = torch.float64
EPS = torch.finfo(F64).eps
#: Float64 values per block of the separable solver (its temporaries stay in cache).
CHUNK = 1 << 15
#: Values per group of short rows solved together (their blocks are loaded once per group).
GROUP = 1 << 17
#: Newton steps per group of rows before the rows left fall back to the breakpoint search.
MAX_NEWTON = 60
#: A row has converged when |f(lam) - d| <= RTOL * (sum_i |c_i x_i| + |d|) (the engine's
#: tolerance table: ``constraint_layers._tolerance.SEPARABLE_RTOL``).
RTOL = SEPARABLE_RTOL

Bound = float | Tensor | None


# ------------------------------------------------------------------------------- validation
def _tensor(x: object, name: str, call: str, *, allow_none: bool = False) -> Tensor | None:
    """A floating tensor (numbers become float64 scalars); None where allowed."""
    if x is None and allow_none:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float, Tensor)):
        raise TypeError(
            f"{call}: {name} must be a number or a floating-point torch.Tensor, "
            f"got {type(x).__name__}."
        )
    if not isinstance(x, Tensor):
        return torch.tensor(float(x), dtype=F64)
    if not x.is_floating_point():
        raise TypeError(
            f"{call}: {name} must be a floating-point tensor, got dtype {x.dtype}. Convert it "
            "with .double() or .float()."
        )
    return x


def _broadcast(shapes: dict[str, tuple[int, ...]], call: str) -> tuple[int, ...]:
    try:
        return tuple(torch.broadcast_shapes(*shapes.values()))
    except RuntimeError:
        given = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise ValueError(
            f"{call}: the arguments must broadcast to one shape (*batch, M, n) (rows in the "
            f"second-to-last axis, their entries in the last); got {given}."
        ) from None


def _finite_check(tensors: dict[str, Tensor | None], call: str, *, bounds: bool = False) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        td = t.detach()
        bad = torch.isnan(td) if bounds else ~torch.isfinite(td)
        if bool(bad.any()):
            what = "NaN" if bounds or bool(torch.isnan(td).any()) else "inf"
            raise ValueError(
                f"{call}: {name} holds {what} (first at index "
                f"{tuple(bad.nonzero()[0].tolist())}); pass finite values"
                + (" (a bound may be -inf / +inf, never NaN)." if bounds else ".")
            )


def _check_order(lo: Tensor | None, hi: Tensor | None, call: str) -> None:
    if lo is None or hi is None:
        return
    bad = lo.detach() > hi.detach()
    if bool(bad.any()):
        idx = tuple(bad.nonzero()[0].tolist())
        lo_v = float(lo.detach().expand(bad.shape)[idx])
        hi_v = float(hi.detach().expand(bad.shape)[idx])
        raise ValueError(
            f"{call}: lower must not exceed upper, but lower = {lo_v!r} > upper = {hi_v!r} at "
            f"index {idx} (of the broadcast shape {tuple(bad.shape)})."
        )


def _check_weight(w: Tensor | None, call: str) -> None:
    if w is None or w.numel() == 0:
        return
    low = float(w.detach().amin())
    if not low >= 0:
        what = "NaN" if math.isnan(low) else f"a negative value ({low:.3e})"
        raise ValueError(
            f"{call}: weight must be non-negative and finite (variances or mobilities; 0 fixes "
            f"an entry), but it holds {what}."
        )


def _check_fixed(u: Tensor, fixed: Tensor, lo: Tensor | None, hi: Tensor | None, call: str) -> None:
    """An entry that cannot move (zero weight) must already lie in its bounds."""
    out = torch.zeros_like(fixed)
    if lo is not None:
        out |= u.detach() < lo.detach()
    if hi is not None:
        out |= u.detach() > hi.detach()
    out &= fixed
    if bool(out.any()):
        idx = tuple(out.nonzero()[0].tolist())
        raise ConstraintError(
            f"{call}: entry {idx} has zero weight (it cannot move) but its value "
            f"{float(u.detach().expand(out.shape)[idx])!r} lies outside its bounds "
            f"[{_at(lo, out.shape, idx)}, {_at(hi, out.shape, idx)}]: no solution exists. "
            "Give it a positive weight, or fix the data."
        )


def _at(t: Tensor | None, shape: tuple[int, ...], idx: tuple[int, ...]) -> str:
    if t is None:
        return "-inf/+inf"
    return repr(float(t.detach().expand(shape)[idx]))


def _infeasible(
    call: str,
    batch: tuple[int, ...],
    rows: Tensor,  # (K,) flat row indices
    total: Tensor,  # (K,)
    low: Tensor,  # (K,)
    high: Tensor,  # (K,)
) -> ConstraintError:
    items = []
    for k in range(min(int(rows.numel()), 5)):
        idx = tuple(int(i) for i in torch.unravel_index(rows[k], batch)) if batch else ()
        items.append(
            f"row {idx}: requested total {float(total[k]):.6g}, reachable range "
            f"[{float(low[k]):.6g}, {float(high[k]):.6g}]"
        )
    more = f" (and {int(rows.numel()) - 5} more)" if rows.numel() > 5 else ""
    return ConstraintError(
        f"{call}: no value within the bounds satisfies {int(rows.numel())} constraint row(s) "
        f"(index in (*batch, M)): " + "; ".join(items) + more + ". The bounds and the fixed "
        "(zero-weight) entries make these totals impossible: check the totals, the bounds and "
        "the wall values."
    )
