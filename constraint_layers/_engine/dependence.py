"""Row dependence and consistency, decided at rounding (private).

Rows ``G u = b`` stated by several constraints may repeat each other (the same total twice, a
total that reads only wall nodes a Dirichlet condition fixes, a row that is a combination of
others). Such rows are fine when their right-hand sides agree, and incompatible when they do
not. Both decisions are made here, once, for every path of the engine:

* the rows are normalised to unit length (a row's scale says nothing about its direction);
* a combination ``y`` (a unit vector) of the unit rows vanishes when ``|y^T G|`` is at most
  :func:`~constraint_layers._tolerance.dependence_tol`: the rows' own rounding (float64, or the
  dtype the coefficients were given in) and the float64 factorisation's, scaled by the number of
  rows and their length. The smallest such norms are the singular values of the unit rows
  (``torch.linalg.svd``: backward stable, so rows dependent to rounding show singular values at
  rounding, whatever ``n``);
* the right-hand sides agree when ``|y^T b|`` is at most
  :func:`~constraint_layers._tolerance.consistency_tol` times their size (``|y|^T |b| + max |b|``
  of the normalised rows), per sample; otherwise
  :class:`~constraint_layers.errors.IncompatibleConstraintsError` names the rows.

Rows clearly independent (every squared pivot of the unit rows' Gram matrix above
``GRAM_INDEPENDENT``, far above rounding) skip the SVD. The decisions depend on the data only
(no random numbers, no ordering effects beyond the order the rows are given in).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._tolerance import (
    CULPRIT_FRACTION,
    GRAM_INDEPENDENT,
    consistency_tol,
    dependence_tol,
    rounding,
)
from ..errors import IncompatibleConstraintsError

__all__ = ["data_rounding", "describe_rows", "independent_rows"]

F64 = torch.float64


def describe_rows(labels: Sequence[str], rows: Sequence[int]) -> str:
    """The first few labels of ``rows``."""
    return ", ".join(labels[i] for i in rows[:6]) + (" ..." if len(rows) > 6 else "")


def data_rounding(
    constraints: Sequence[Any], dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """``(eps_rows, eps_rhs)``: the rounding units of the constraints' coefficients, and of their
    values together with the output ``dtype`` (float64's at least)."""
    coeff, value = [], [dtype]
    for c in constraints:
        G = getattr(c, "G", None)
        if isinstance(G, Tensor):
            coeff.append(G.dtype)
        for name in ("b", "value"):
            v = getattr(c, name, None)
            if isinstance(v, Tensor):
                value.append(v.dtype)
    eps_rows = rounding(*coeff)
    return eps_rows, max(eps_rows, rounding(*value))


def _unit(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(1 / |g_i|, |g_i| > 0)``: zero rows keep scale 1 (they read nothing)."""
    norms = G.norm(dim=-1)
    nonzero = norms > 0
    return torch.where(nonzero, 1.0 / torch.where(nonzero, norms, 1.0), 1.0), nonzero


def _clearly_independent(Gn: Tensor) -> bool:
    """Every squared pivot of the unit rows' Gram matrix above ``GRAM_INDEPENDENT``."""
    gram = Gn @ Gn.mT
    L, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        return False
    return bool((L.diagonal(dim1=-2, dim2=-1).square() > GRAM_INDEPENDENT).all())


def independent_rows(
    G: Tensor,
    b: Tensor,
    labels: Sequence[str],
    call: str,
    *,
    eps_rows: float | None = None,
    eps_rhs: float | None = None,
) -> tuple[Tensor, Tensor]:
    """An equivalent system of independent rows for ``G u = b``, after checking that dependent
    rows agree (else :class:`IncompatibleConstraintsError`, naming them).

    Parameters
    ----------
    G : Tensor
        shape: (M, N), float64, shared by the batch.
    b : Tensor
        shape: (batch, M), float64.
    labels : sequence of str
        One name per row (for the message).
    call : str
        The user's call (for the message).
    eps_rows, eps_rhs : float, optional
        The rounding units of the coefficients and of the values (default float64's).

    Returns
    -------
    tuple of Tensor
        ``(G, b)`` themselves when no row depends on the others; otherwise an orthonormal basis
        of the rows' span and its right-hand sides, ``(R, N)`` and ``(batch, R)`` (the same
        constraint set: every dropped row holds to rounding where the basis holds).
    """
    eps64 = torch.finfo(F64).eps
    eps_rows = eps64 if eps_rows is None else eps_rows
    eps_rhs = eps_rows if eps_rhs is None else max(eps_rhs, eps_rows)
    m, n = G.shape[-2], G.shape[-1]
    if m == 0:
        return G, b
    G64, b64 = G.to(F64), b.to(F64)
    unit, nonzero = _unit(G64)
    Gn = G64 * unit.unsqueeze(-1)
    bn = b64 * unit
    if bool(nonzero.all()) and _clearly_independent(Gn):
        return G, b
    U, s, Vh = torch.linalg.svd(Gn, full_matrices=m > n)
    if m > s.shape[-1]:
        s = torch.cat([s, s.new_zeros(m - s.shape[-1])])
    tol = dependence_tol(eps_rows, m, n)
    top = float(s.amax()) if s.numel() else 0.0
    keep = s > tol * max(top, 1.0)
    if bool(keep.all()):
        return G, b
    null = U[:, ~keep]  # (M, K0): combinations of the unit rows that vanish
    off = (bn @ null).abs()  # (batch, K0)
    size = bn.abs() @ null.abs() + bn.abs().amax(-1, keepdim=True)
    bad = off > (consistency_tol(eps_rhs, m) + tol) * size
    if bool(bad.any()):
        combos = null[:, bad.any(0)].abs()
        culprits = (
            (combos > CULPRIT_FRACTION * combos.amax(0, keepdim=True)).any(1).nonzero().flatten()
        )
        which = culprits.tolist()
        raise IncompatibleConstraintsError(
            f"{call}: the constraints cannot hold together: {describe_rows(labels, which)} "
            "depend on each other (or read only values that other constraints fix), but their "
            f"values disagree (off by {float(off.max()):.3e} in a combination that must vanish, "
            f"against values of size {float(size.max()):.3e}). Check the values and totals "
            "(e.g. a total that the wall values make impossible).",
            tuple(which),
        )
    r = int(keep.sum())  # the singular values come sorted: the kept ones first
    return Vh[:r].to(G.dtype), ((bn @ U[:, :r]) / s[:r]).to(b.dtype)
