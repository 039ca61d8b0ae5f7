"""The separable fast solve of ``C M C^T``'s Kronecker-sum part (private).

Per differentiated axis, the factor ``F_axis = sum_c A_c diag(free) A_c^T``
(:meth:`~constraint_layers.local.operator.LocalOperator.factors`) is diagonalised by its dense
eigenvectors or, where it allows, by the DCT-II (:mod:`~constraint_layers.local.transforms`);
the solve divides by the sum of the per-axis eigenvalues. Cached per operator and free lines
(the masks' keys are computed once per mask tensor).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

from .._tolerance import DCT_END_ROWS, DCT_MIN_NODES, NULL_RTOL
from .operator import LocalOperator
from .transforms import dct, dct_eigenvalues, dct_matrix, idct

__all__ = ["FastSolve", "fast_solve", "op_key"]

F64 = torch.float64


# ------------------------------------------------------------------ the separable solve
class FastSolve:
    """The pseudo-inverse of a Kronecker sum ``sum_axes F_axis``: per axis ``F = Q diag(lam)
    Q^T``, ``x = Q (lam_sum^+ (Q^T r))``.

    Per axis, ``Q`` is either the orthonormal DCT-II (:mod:`~constraint_layers.local.transforms`,
    ``O(n log n)`` per line, by FFT) or the factor's dense eigenvectors (``O(n^2)`` per line).
    The DCT serves an axis with at least :data:`DCT_MIN_NODES` nodes whose factor equals, but
    for a few rows at each end (:data:`DCT_END_ROWS`), the DCT-diagonalised matrix of its
    interior stencil: the fast solve then inverts that matrix (``approximate``), and the
    capacitance solve or CG makes up the end rows. ``dct``: force (True) or forbid (False) it
    (None: by size).
    """

    def __init__(
        self, op: LocalOperator, free: tuple | None = None, dct: bool | None = None
    ) -> None:
        self.axes: list = []
        self.approximate = False
        lam = None
        for axis, f in enumerate(op.factors(free)):
            if f is None:
                self.axes.append(None)
                continue
            use = f.shape[0] >= DCT_MIN_NODES if dct is None else dct
            entry = _dct_axis(f) if use and not op.periodic[axis] else None
            if entry is None:
                entry = ("dense", *_eigh(f))
            else:
                self.approximate = True
            self.axes.append(entry)
            view = [1] * len(op.grid)
            view[axis] = -1
            part = entry[1].reshape(view)
            lam = part if lam is None else lam + part
        self.null = lam <= NULL_RTOL * lam.amax()
        # positive definite: the null space (of the fast operator, perhaps not of the system's)
        # is weighted as the smallest non-zero eigenvalue, so CG reaches it where the system
        # needs it (a consistent right-hand side has no component there when they agree)
        low = lam.where(~self.null, lam.amax()).amin()
        self.low = float(low)
        self.lam = lam.where(~self.null, 0.0)
        self.inv = 1.0 / torch.where(self.null, low, lam)
        self._on_device: dict = {}

    def _device(self, device: torch.device) -> tuple[list, Tensor, Tensor]:
        """The eigenvectors, inverse and null mask on ``device`` (copied once)."""
        hit = self._on_device.get(device)
        if hit is None:
            qs = [None if e is None or e[0] == "dct" else e[2].to(device) for e in self.axes]
            hit = (qs, self.inv.to(device), self.null.to(device))
            self._on_device[device] = hit
        return hit

    def _rotate(self, r: Tensor, transpose: bool) -> Tensor:
        qs = self._device(r.device)[0]
        for axis, e in enumerate(self.axes):
            if e is None:
                continue
            x = r.movedim(axis + 1, -1)
            if e[0] == "dct":
                x = dct(x) if transpose else idct(x)
            else:
                x = x @ qs[axis] if transpose else x @ qs[axis].T
            r = x.movedim(-1, axis + 1)
        return r

    def __call__(self, r: Tensor) -> Tensor:
        """``(sum F)^+ r`` for ``r`` (batch, *grid) float64 (on the null space: ``r / max
        lam``)."""
        return self._rotate(self._rotate(r, True) * self._device(r.device)[1], False)

    def forward(self, x: Tensor) -> Tensor:
        """``P x`` with ``P`` the Kronecker sum itself (its null space left at zero), for the
        capacitance solve."""
        return self._rotate(self._rotate(x, True) * self.lam.to(x.device), False)

    def null_vectors(self, device: torch.device) -> Tensor:
        """An orthonormal basis of ``P``'s null space, (k, *grid) float64: the solve weights it
        as :attr:`low`, the smallest non-zero eigenvalue."""
        idx = self.null.flatten().nonzero().flatten()
        unit = torch.zeros((idx.numel(), self.null.numel()), dtype=F64)
        unit[torch.arange(idx.numel()), idx] = 1.0
        return self._rotate(unit.reshape(-1, *self.null.shape), False).to(device)

    def null_part(self, r: Tensor) -> Tensor:
        """The component of ``r`` in the null space: (batch, *grid)."""
        return self._rotate(self._rotate(r, True) * self._device(r.device)[2], False)


def _eigh(f: Tensor) -> tuple[Tensor, Tensor]:
    lam, q = torch.linalg.eigh(f)
    return lam.clamp_min(0.0), q


def _dct_axis(f: Tensor) -> tuple[str, Tensor] | None:
    """``("dct", eigenvalues)`` of the DCT-diagonalised matrix of ``f``'s interior stencil when
    ``f`` differs from it on at most :data:`DCT_END_ROWS` rows at each end (else None)."""
    n = f.shape[0]
    mid = n // 2
    size = float(f.abs().max())
    row = f[mid]
    nz = (row.abs() > NULL_RTOL * size).nonzero().flatten()
    if nz.numel() == 0:
        return None
    k = int((nz - mid).abs().max())
    if mid - k < DCT_END_ROWS or mid + k >= n - DCT_END_ROWS:
        return None
    stencil = row[mid - k : mid + k + 1]
    if float((stencil - stencil.flip(0)).abs().max()) > NULL_RTOL * size:
        return None  # not symmetric: no cosine transform diagonalises it
    lam = dct_eigenvalues(stencil, n)
    t = dct_matrix(n)
    diff = (f - t.T @ (lam.unsqueeze(1) * t)).abs().amax(1)
    rows = (diff > NULL_RTOL * size).nonzero().flatten()
    if bool(((rows >= DCT_END_ROWS) & (rows < n - DCT_END_ROWS)).any()):
        return None
    return ("dct", lam.clamp_min(0.0))


@lru_cache(maxsize=32)
def fast_solve(op_key: tuple, free: tuple | None = None, dct: bool | None = None) -> FastSolve:
    """The cached fast solve of an operator (keyed by its terms and grid, and the free nodes
    along each term's axis)."""
    return FastSolve(LocalOperator(*op_key), free, dct)


def _free_lines(op: LocalOperator, mask: Tensor | None) -> tuple | None:
    """Per term, the nodes along its axis that are free on some line (None: all free)."""
    if mask is None:
        return None
    return _free_lines_cached(op_key(op), _mask_key(mask))


@lru_cache(maxsize=64)
def _free_lines_cached(key: tuple, mask_key: tuple) -> tuple:
    op = LocalOperator(*key)
    mask = _mask_from_key(mask_key)
    out = []
    for t in op.terms:
        m = mask[t.channel].movedim(t.axis, -1).reshape(-1, op.grid[t.axis]).any(0)
        out.append(tuple(m.tolist()))
    return tuple(out)


def op_key(op: LocalOperator) -> tuple:
    return (op.terms, op.shape, op.spacing, op.stencil, op.periodic)


def _mask_key(mask: Tensor) -> tuple:
    """A hashable copy of a mask (the caches' key), computed once per mask tensor."""
    hit = _MASK_KEYS.get(id(mask))
    if hit is not None and hit[0] is mask:
        return hit[1]
    key = (tuple(mask.shape), mask.detach().cpu().numpy().tobytes())
    if len(_MASK_KEYS) > 64:
        _MASK_KEYS.clear()
    _MASK_KEYS[id(mask)] = (mask, key)
    return key


#: The last masks' keys, by identity (a mask is built once per call and read several times).
_MASK_KEYS: dict[int, tuple[Tensor, tuple]] = {}


def _mask_from_key(mask_key: tuple) -> Tensor:
    shape, raw = mask_key
    return torch.frombuffer(bytearray(raw), dtype=torch.bool).reshape(shape)
