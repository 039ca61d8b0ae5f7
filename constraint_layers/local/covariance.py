"""Gaussians with a full covariance (dense, low rank, a linear operator) conditioned on local
rows, with walls of any kind and totals (private).

``N(m, Sigma)`` over a grid output ``(batch, channels, *grid)`` (``Sigma`` over the flat event
``N = channels * prod(grid)``, C order) conditioned on the rows, in stages (conditioning on
noise-free linear rows in stages is the joint conditioning):

1. the wall rows (``cl.Dirichlet``, ``cl.Neumann``, periodic: a few sparse rows, those of
   :func:`~constraint_layers.boundary.enforce.boundary_rows` that a joint projection conditions
   on) by the Schur complement: ``V = A Sigma`` (one product of ``Sigma`` per row; on a
   diagonal prior only the columns the rows touch), ``K = A Sigma A^T`` factored densely
   (``r x N`` memory for a full or low-rank prior: wall rows with those fit grids up to about
   128 x 128);
2. the local rows ``C u = f`` matrix-free: CG on ``K = C Sigma_1 C^T`` preconditioned by the
   constant-coefficient fast solve of ``C C^T`` scaled on each side by the diagonal of
   ``Sigma_1`` averaged over a window (the mean variance, locally); the Dirichlet nodes are
   eliminated (the free-node mask) as for a diagonal variance; after other wall rows the fast
   solve is that of ``C Pi C^T``, ``Pi`` the wall rows' null-space projector along each
   channel's own axis (:func:`_wall_fast_solve`);
3. the totals (a few dense rows) by the Schur complement over the local stage (one local solve
   per row).

- Mean: each stage's ``x - Sigma_k A^T K^+ (A x - d)``; every row holds to rounding. Gradients
  flow to the mean, the rows' values and ``Sigma`` (a tensor, the low-rank factors, or a linear
  operator that autograd differentiates) through an implicit backward: one more CG solve, never
  autograd through the iterations.
- Draws: Matheron's rule, exact: a draw of the prior (dense: Cholesky, or the symmetric root if
  singular; low rank: ``L z1 + sqrt(d) z2``; a linear operator: its ``root_decomposition()`` or
  its dense form) moved by the same stages.
- Marginal variances: exact by dense float64 algebra (all rows stacked, ``K`` factored on its
  range) up to ``DENSE_VARIANCE_MAX_NODES`` nodes per channel; beyond that
  :meth:`LocalConditioned.estimate_variance` (Hutchinson, Rademacher probes, with its standard
  error).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._tolerance import MAXITER, tolerance
from ..errors import ConstraintViolationError, IncompatibleConstraintsError
from ..rows import GridSpec, Rows
from .solve import NULL_RTOL, FastSolve, System
from .totals import solve_small

__all__ = ["DENSE_VARIANCE_MAX_NODES", "LocalConditioned", "Prior", "condition_covariance"]

F64 = torch.float64
TINY = torch.finfo(F64).tiny
#: The largest grid (nodes per channel) whose marginal variances are formed densely (64 x 64).
DENSE_VARIANCE_MAX_NODES = 64 * 64


# ------------------------------------------------------------------------------------ prior
class Prior:
    """``Sigma`` over the flat event (``N``) of ``B`` samples: a dense tensor, ``diag(d) + L
    L^T`` (``d`` optional), a diagonal, or a linear operator (anything with ``matmul`` or
    ``@``, and ``diagonal()``). Every method returns float64."""

    def __init__(self, B: int, N: int, *, S: Any = None, L: Tensor | None = None,
                 d: Tensor | None = None) -> None:  # fmt: skip
        self.B, self.N = B, N
        self.lazy = S is not None and not isinstance(S, Tensor)
        if self.lazy and getattr(S, "dtype", F64) != F64 and hasattr(S, "to"):
            S = S.to(F64)  # products in float64 (a float32 model's operator, evaluated in float64)
        self.S = S.to(F64) if isinstance(S, Tensor) else S
        self.L = None if L is None else L.to(F64)
        self.d = None if d is None else d.to(F64)

    @classmethod
    def make(cls, B: int, N: int, covariance: Any, low_rank: Any, variance: Any, call: str):
        """Check the user's inputs and build the prior (``variance`` (B, N) or None)."""
        if covariance is not None:
            if variance is not None or low_rank is not None:
                raise ValueError(
                    f"{call}: give the uncertainty once: variance= (diagonal), variance= with "
                    "low_rank= (diagonal plus low rank), or covariance= (full); got covariance= "
                    "together with another."
                )
            if isinstance(covariance, Tensor):
                if not covariance.is_floating_point():
                    raise TypeError(f"{call}: covariance must be a floating-point tensor.")
            elif not (
                hasattr(covariance, "diagonal")
                and (hasattr(covariance, "matmul") or hasattr(covariance, "__matmul__"))
            ):
                raise TypeError(
                    f"{call}: covariance must be a tensor of shape (N, N) or (batch, N, N), or a "
                    "linear operator (with matmul or @, and diagonal()), got "
                    f"{type(covariance).__name__}."
                )
            shape = tuple(covariance.shape)
            if len(shape) not in (2, 3) or shape[-2:] != (N, N) or (
                    len(shape) == 3 and shape[0] not in (1, B)):  # fmt: skip
                raise ValueError(
                    f"{call}: covariance must have shape ({N}, {N}) or ({B}, {N}, {N}) (the "
                    f"flattened event channels * prod(grid) = {N}, C order), got {shape}."
                )
            return cls(B, N, S=covariance)
        if low_rank is not None:
            if not isinstance(low_rank, Tensor) or not low_rank.is_floating_point():
                raise TypeError(f"{call}: low_rank must be a floating-point tensor (N, K).")
            shape = tuple(low_rank.shape)
            if len(shape) not in (2, 3) or shape[-2] != N or (
                    len(shape) == 3 and shape[0] not in (1, B)):  # fmt: skip
                raise ValueError(
                    f"{call}: low_rank must have shape ({N}, K) or ({B}, {N}, K) (Sigma = "
                    f"diag(variance) + L L^T over the flattened event), got {shape}."
                )
            return cls(B, N, L=low_rank, d=variance)
        if variance is None:
            raise ValueError(f"{call}: no uncertainty given (variance, covariance or low_rank).")
        return cls(B, N, d=variance)

    def _op_mv(self, X: Tensor) -> Tensor:
        """``S X`` for a linear operator, ``X`` (..., B, N)."""
        lead = X.shape[:-2]
        k = math.prod(lead)
        dtype = getattr(self.S, "dtype", F64)
        if len(self.S.shape) == 3:
            cols = X.reshape(k, self.B, self.N).permute(1, 2, 0).to(dtype)  # (B, N, k)
            if self.S.shape[0] == 1 and self.B > 1:
                cols = cols.permute(1, 0, 2).reshape(1, self.N, self.B * k)
                out = _matmul(self.S, cols).reshape(self.N, self.B, k).permute(1, 0, 2)
            else:
                out = _matmul(self.S, cols)
            return out.permute(2, 0, 1).reshape(X.shape).to(F64)
        cols = X.reshape(-1, self.N).T.to(dtype)
        return _matmul(self.S, cols).T.reshape(X.shape).to(F64)

    def mv(self, X: Tensor) -> Tensor:
        """``Sigma x`` for ``X`` (..., B, N) float64."""
        if self.S is not None:
            if self.lazy:
                return self._op_mv(X)
            return (self.S @ X.unsqueeze(-1)).squeeze(-1)
        out = 0.0 if self.d is None else self.d * X
        if self.L is not None:
            t = self.L.mT @ X.unsqueeze(-1)
            out = out + (self.L @ t).squeeze(-1)
        return out

    def diag(self) -> Tensor:
        """(B, N)."""
        if self.S is not None:
            if self.lazy:
                try:
                    dg = self.S.diagonal(dim1=-2, dim2=-1)
                except TypeError:
                    dg = self.S.diagonal()
                dg = dg.to_dense() if hasattr(dg, "to_dense") else dg
                return torch.as_tensor(dg).to(F64).expand(self.B, self.N)
            return self.S.diagonal(dim1=-2, dim2=-1).expand(self.B, self.N)
        out = torch.zeros((self.B, self.N), dtype=F64)
        if self.d is not None:
            out = out.to(self.d.device) + self.d
        if self.L is not None:
            out = out.to(self.L.device) + self.L.square().sum(-1)
        return out

    def dense(self) -> Tensor:
        """(B, N, N)."""
        if self.S is not None:
            if self.lazy:
                S = (
                    self.S.to_dense()
                    if hasattr(self.S, "to_dense")
                    else _matmul(self.S, torch.eye(self.N, dtype=getattr(self.S, "dtype", F64)))
                )
                return torch.as_tensor(S).to(F64).expand(self.B, self.N, self.N)  # fmt: skip
            return self.S.expand(self.B, self.N, self.N)
        out = torch.zeros((self.B, self.N, self.N), dtype=F64)
        if self.d is not None:
            out = out.to(self.d.device) + torch.diag_embed(self.d.expand(self.B, self.N))
        if self.L is not None:
            out = out.to(self.L.device) + self.L @ self.L.mT
        return out

    def draw(self, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
        """``n`` zero-mean draws of ``N(0, Sigma)``: (n, B, N) float64."""
        if self.S is None:
            out = torch.zeros((n, self.B, self.N), dtype=F64, device=device)
            if self.d is not None:
                eps = torch.randn((n, self.B, self.N), dtype=F64, generator=generator)
                out = out + self.d.sqrt() * eps.to(device)
            if self.L is not None:
                z = torch.randn((n, self.B, self.L.shape[-1], 1), dtype=F64, generator=generator)
                out = out + (self.L @ z.to(device)).squeeze(-1)
            return out
        root = None
        big = self.N > 2 * DENSE_VARIANCE_MAX_NODES
        if self.lazy and big and hasattr(self.S, "root_decomposition"):
            r = self.S.root_decomposition().root
            root = torch.as_tensor(r.to_dense() if hasattr(r, "to_dense") else r).to(F64)
            root = root.expand(self.B, self.N, root.shape[-1])
        if root is None:
            S = self.dense()
            root, info = torch.linalg.cholesky_ex(S)
            if bool((info != 0).any()):  # singular: the symmetric root
                lam, Q = torch.linalg.eigh(0.5 * (S + S.mT))
                root = Q * lam.clamp_min(0.0).sqrt().unsqueeze(-2)
        z = torch.randn((n, self.B, root.shape[-1], 1), dtype=F64, generator=generator)
        return (root @ z.to(root.device)).squeeze(-1)


def _matmul(op: Any, x: Tensor) -> Tensor:
    out = op.matmul(x) if hasattr(op, "matmul") else op @ x
    return out.to_dense() if hasattr(out, "to_dense") and not isinstance(out, Tensor) else out


# --------------------------------------------------------------------- range-restricted solve
class _RangeSolve:
    """``K^+`` of a small symmetric PSD ``K`` (*, r, r), differentiable: the range found once
    (detached eigendecomposition, ``NULL_RTOL``), ``Q^T K Q`` factored by Cholesky."""

    def __init__(self, K: Tensor) -> None:
        K = 0.5 * (K + K.mT)
        lam, Q = torch.linalg.eigh(K.detach())
        keep = lam > NULL_RTOL * lam.amax(-1, keepdim=True).clamp_min(TINY)
        # the same number kept per batch entry (pad with the null directions scaled to 0)
        self.Q = Q * keep.unsqueeze(-2)
        kr = Q.mT @ K @ Q
        eye = torch.diag_embed((~keep).to(F64))
        self.L = torch.linalg.cholesky(kr * keep.unsqueeze(-1) * keep.unsqueeze(-2) + eye)

    def __call__(self, v: Tensor) -> Tensor:
        """``K^+ v`` for ``v`` (..., *, r)."""
        q = self.Q.mT @ v.unsqueeze(-1)
        L = self.L.expand(*q.shape[:-2], *self.L.shape[-2:])
        y = torch.cholesky_solve(q, L)
        return (self.Q @ y).squeeze(-1)

    def half(self, V: Tensor) -> Tensor:
        """``L^-1 Q^T V`` for ``V`` (*, r, k): ``K^+ = (..)^T (..)``."""
        return torch.linalg.solve_triangular(self.L, self.Q.mT @ V, upper=False)


# --------------------------------------------------------------------------------- stages
class _RowsStage:
    """A few rows ``A u = d`` (walls or totals) conditioned on by the Schur complement:
    ``Sigma' = Sigma - V^T K^+ V`` with ``V = A Sigma``, ``K = A V^T``.

    On a diagonal prior ``V`` lives on the columns the rows touch (``U``, a few per row): it is
    kept there, dense (``r x |U|``), so that wall rows cost ``O(r^2 |U| / r)`` on any grid."""

    def __init__(self, prev: Any, rows: Rows, labels: list[str], call: str) -> None:
        self.prev, self.labels, self.call, self.rows = prev, labels, call, rows
        B, N = prev.B, prev.N
        self.B, self.N = B, N
        dev = rows.rhs.device
        self.d = rows.rhs.to(F64)
        diagonal = isinstance(prev, Prior) and prev.S is None and prev.L is None
        if diagonal:
            index = rows.index.to(dev)
            self.U = torch.unique(index)  # sorted
            pos = torch.searchsorted(self.U, index)
            coeff = rows.coeff.to(dev, F64)
            A = torch.zeros((*coeff.shape[:-1], self.U.numel()), dtype=F64, device=dev)
            self.A = A.scatter_add_(-1, pos.expand(*coeff.shape), coeff)  # (B?, r, |U|)
            self.V = self.A * prev.d[..., self.U].unsqueeze(-2)  # (B, r, |U|)
        else:
            self.U = None
            self.A = rows.dense(N).to(dev)
            At = self.A.expand(B, *self.A.shape[-2:]).permute(1, 0, 2)  # (r, B, N)
            self.V = prev.mv(At).permute(1, 0, 2)  # (B, r, N)
        K = self.A @ self.V.mT
        self.K = 0.5 * (K + K.mT)
        self.solve = _RangeSolve(self.K)

    def _take(self, x: Tensor) -> Tensor:
        return x if self.U is None else x[..., self.U]

    def _put(self, v: Tensor) -> Tensor:
        if self.U is None:
            return v
        out = torch.zeros((*v.shape[:-1], self.N), dtype=v.dtype, device=v.device)
        return out.index_add(-1, self.U, v)

    def _rows(self, x: Tensor) -> Tensor:  # (..., B, N) -> (..., B, r)
        return (self.A @ self._take(x).unsqueeze(-1)).squeeze(-1)

    def _step(self, mu: Tensor) -> Tensor:  # V^T mu: (..., B, r) -> (..., B, N)
        return self._put((mu.unsqueeze(-2) @ self.V).squeeze(-2))

    def mv(self, X: Tensor) -> Tensor:
        mu = self.solve((self.V @ self._take(X).unsqueeze(-1)).squeeze(-1))
        return self.prev.mv(X) - self._step(mu)

    def project(self, x: Tensor, dtype: torch.dtype, check: bool = True) -> Tensor:
        r = self._rows(x) - self.d
        if check:
            with torch.no_grad():
                ax = (self.A.abs() @ self._take(x.detach()).abs().unsqueeze(-1)).squeeze(-1)
                K = self.K.detach().expand(*r.shape[:-1], *self.K.shape[-2:])
                solve_small(K, r.detach(), ax + self.d.abs(), tolerance(dtype).residual,
                            self.labels, self.call)  # fmt: skip
        return x - self._step(self.solve(r))

    def diag(self) -> Tensor:
        H = self.solve.half(self.V)  # (B, r, |U|)
        return self.prev.diag() - self._put(H.square().sum(-2))


class _CovSystem(System):
    """``K = C M Sigma M C^T`` (``Sigma`` a stage's covariance, ``M`` the free-node mask):
    :class:`~constraint_layers.local.solve.System`'s CG, checks and preconditioner (the fast
    solve scaled by the diagonal of ``Sigma`` averaged over a window)."""

    def __init__(self, op: Any, mask: Tensor | None, diag: Tensor, mv: Callable) -> None:
        super().__init__(op, mask, diag)
        self._mv = mv

    def mobility(self, x: Tensor) -> Tensor:
        if self.mask is not None:
            x = x * self.mask.to(x.device)
        x = self._mv(x)
        if self.mask is not None:
            x = x * self.mask.to(x.device)
        return x


class _Factors:
    """Per-axis Kronecker factors for :class:`~constraint_layers.local.solve.FastSolve`."""

    def __init__(self, grid: tuple, factors: list) -> None:
        self.grid, self._factors = grid, factors

    def factors(self, free: Any = None) -> list:
        return self._factors


def _wall_fast_solve(op: Any, rows: Rows) -> FastSolve:
    """The fast solve of ``C Pi C^T`` with ``Pi`` the wall rows' null-space projector along each
    term's own axis: per axis ``F = sum_c D_c Pi_c D_c^T``, ``Pi_c = I - A^+ A`` with ``A`` the
    wall rows of channel ``c`` on a line along that axis (the middle line; a Neumann row ties
    the wall value to the interior, so the normal derivative at the wall vanishes in ``C
    Sigma_1 C^T``). The rows across the axis (a channel's tangential walls) are left out: a
    preconditioner."""
    shape, grid = op.shape, op.grid
    coeff = rows.coeff if rows.coeff.ndim == 2 else rows.coeff[0]
    coeff = coeff.to(F64).cpu()
    multi = torch.stack(torch.unravel_index(rows.index.cpu(), shape), -1)  # (r, K, 1 + d)
    nz = coeff != 0
    ref = [g // 2 for g in grid]
    factors: list = [None] * len(grid)
    for axis in axes_of(op):
        n = grid[axis]
        F = torch.zeros((n, n), dtype=F64)
        mats: dict = {}
        for t, st in zip(op.terms, op.ops):
            if t.axis == axis:
                mats[t.channel] = st.dense() * t.coefficient + mats.get(t.channel, 0.0)
        for c, D in mats.items():
            sel = ((multi[..., 0] == c) | ~nz).all(-1) & nz.any(-1)
            for k in range(len(grid)):
                if k != axis:
                    sel &= ((multi[..., 1 + k] == ref[k]) | ~nz).all(-1)
            Pi = torch.eye(n, dtype=F64)
            if bool(sel.any()):
                A = torch.zeros((int(sel.sum()), n), dtype=F64)
                A.scatter_add_(1, multi[sel][..., 1 + axis], coeff[sel] * nz[sel])
                Pi = Pi - torch.linalg.pinv(A) @ A
            F = F + D @ Pi @ D.T
        factors[axis] = F
    return FastSolve(_Factors(grid, factors))  # type: ignore[arg-type]


def axes_of(op: Any) -> tuple[int, ...]:
    return tuple(sorted({t.axis for t in op.terms}))


class _ZeroSolve(torch.autograd.Function):
    """Value 0, derivative ``K^+``: ``lam* - _ZeroSolve(K lam* - r)`` is ``lam*`` with the
    implicit derivative of ``K lam = r`` (one more CG solve in the backward)."""

    @staticmethod
    def forward(ctx: Any, resid: Tensor, solve: Callable[[Tensor], Tensor]) -> Tensor:
        ctx.solve = solve
        return torch.zeros_like(resid)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor):
        return ctx.solve(g), None


class _LocalStage:
    """The local rows ``C u = f`` on a stage's covariance: CG on ``C M Sigma M C^T``."""

    def __init__(
        self, prev: Any, op: Any, f: Tensor, mask: Tensor | None, call: str, walls: bool = False
    ) -> None:
        self.prev, self.op, self.f, self.mask, self.call = prev, op, f, mask, call
        #: after wall rows other than Dirichlet nodes (Neumann, periodic): the fast solve does
        #: not see them, CG converges slowly (no stop on stagnation, up to MAXITER)
        self.walls = walls
        self.wall_rows: Rows | None = getattr(prev, "rows", None) if walls else None
        self.B, self.N = prev.B, prev.N
        self.fields = (op.shape[0], *op.grid)
        self._diag = prev.diag().detach().reshape(self.B, *self.fields)
        self._systems: dict[int, _CovSystem] = {}
        self.iterations: list[int] = []

    def _system(self, rep: int) -> _CovSystem:
        if rep not in self._systems:
            diag = self._diag.repeat(rep, *[1] * len(self.fields))

            def mv(x: Tensor) -> Tensor:
                flat = x.reshape(rep, self.B, self.N)
                return self.prev.mv(flat).reshape(x.shape)

            system = _CovSystem(self.op, self.mask, diag, mv)
            if self.walls:
                system.patience = MAXITER
                if self.wall_rows is not None and self.op.separable:
                    system.pre = _wall_fast_solve(self.op, self.wall_rows)
            self._systems[rep] = system
        return self._systems[rep]

    def _solve(self, rhs: Tensor, rep: int, scale: Tensor, check: bool) -> Tensor:
        with torch.no_grad():  # never autograd through the iterations
            try:
                lam, it = self._system(rep).solve(rhs, scale, self.call, check=check)
            except (IncompatibleConstraintsError, ConstraintViolationError) as e:
                if not self.walls:
                    raise
                raise IncompatibleConstraintsError(
                    f"{self.call}: the local rows cannot hold to rounding with these walls: CG "
                    "on the rows after conditioning on the Neumann / periodic wall rows did not "
                    f"converge ({e}). Either the wall values are incompatible with the rows (no "
                    "field satisfies both), or the preconditioner (the wall rows along each "
                    "channel's own axis; those across it, and a non-separable operator, left "
                    "out) is too far from this covariance: CG ran out of its MAXITER iterations. "
                    "Check the wall values; a coarser grid or cl.Dirichlet walls (eliminated "
                    "exactly) converge faster."
                ) from None
        self.iterations.append(it)
        return lam

    def _backward_solve(self, rep: int) -> Callable[[Tensor], Tensor]:
        def solve(g: Tensor) -> Tensor:
            scale = g.abs().flatten(1).amax(1) + TINY
            lam, _ = self._system(rep).solve(g, scale, self.call + " (backward)", check=False)
            return lam

        return solve

    def _move(self, lam: Tensor, rep: int) -> Tensor:
        return self._system(rep).move(lam).reshape(rep, self.B, self.N)

    def project(self, x: Tensor, f: Tensor | None, check: bool = True) -> Tensor:
        """``x - M Sigma M C^T K^+ (C x - f)`` for ``x`` (rep, B, N) float64, ``f`` (B, *grid)
        or None (0)."""
        rep = x.shape[0]
        fields = x.reshape(rep * self.B, *self.fields)
        r = self.op.apply(fields)
        fr = None
        if f is not None:
            fr = f.repeat(rep, *[1] * (f.ndim - 1))
            r = r - fr
        zs = fields.detach().abs().flatten(1).amax(1)
        fs = fr.detach().abs().flatten(1).amax(1) if fr is not None else 0.0
        scale = self.op.row_scale() * zs + fs + TINY
        lam = self._solve(r.detach(), rep, scale, check)
        if torch.is_grad_enabled() and (r.requires_grad or _needs_grad(self.prev)):
            resid = self.op.apply(self._move(lam, rep).reshape(fields.shape)) - r
            lam = lam - _ZeroSolve.apply(resid, self._backward_solve(rep))
        return x - self._move(lam, rep)

    def mv(self, X: Tensor) -> Tensor:
        lead = X.shape[:-2]
        x = X.reshape(-1, self.B, self.N)
        out = self.project(self.prev.mv(x), None, check=False)
        return out.reshape(*lead, self.B, self.N)

    def diag(self) -> Tensor:
        raise NotImplementedError  # the exact diagonal is dense (see LocalConditioned)


def _needs_grad(stage: Any) -> bool:
    while hasattr(stage, "prev"):
        stage = stage.prev
    parts = [stage.S, stage.L, stage.d]
    return any(isinstance(p, Tensor) and p.requires_grad for p in parts) or (
        stage.lazy and torch.is_grad_enabled()
    )


# ------------------------------------------------------------------------------ the result
class LocalConditioned:
    """A Gaussian with a full covariance conditioned on local rows (and walls, and totals).

    Attributes
    ----------
    mean : Tensor
        (batch, channels, *grid): every row holds to rounding; differentiable (implicit
        backward) in the mean, the rows' values and the covariance.
    iterations : list of int
        The CG iteration counts of the local solves so far (the mean's first).
    """

    #: the posterior is degenerate on the rows (no constraint noise): for the adapters
    noise_free = True

    def __init__(self, mean, m, stages, prior, dense_rows, mask, lead, dtype, call) -> None:
        self.mean = mean
        self._m = m  # the prior's mean
        self._stages, self._prior = stages, prior
        self._dense_rows = dense_rows  # () -> (A (B?, R, N), d (B, R)) float64
        self._mask, self._lead = mask, lead
        self._dtype, self._call = dtype, call
        self._factor: Tensor | None = None
        self._dens: Any = None

    @property
    def iterations(self) -> list[int]:
        local = [s for s in self._stages if isinstance(s, _LocalStage)]
        return local[0].iterations if local else []

    @property
    def _last(self) -> Any:
        return self._stages[-1] if self._stages else self._prior

    def _check_dense(self) -> None:
        n = math.prod(self.mean.shape[2:])
        if n > DENSE_VARIANCE_MAX_NODES:
            raise NotImplementedError(
                f"{self._call}: exact marginal variances (and the dense posterior covariance) are "
                f"formed densely up to {DENSE_VARIANCE_MAX_NODES} nodes per channel (64 x 64); "
                f"this grid has {n}. Estimate them with their standard error: "
                "g.estimate_variance(probes) (functional.condition_local)."
            )

    @property
    def factor(self) -> Tensor:
        """``F`` (batch, N, r) float64 with posterior covariance ``Sigma - F F^T`` (dense
        algebra: all rows ``A`` stacked, ``F = Sigma A^T (A Sigma A^T)^{+1/2}`` on the range)."""
        if self._factor is None:
            self._check_dense()
            A, _ = self._dense_rows()
            B = self._prior.B
            SAt = self._prior.mv(A.expand(B, *A.shape[-2:]).permute(1, 0, 2)).permute(1, 2, 0)
            solve = _RangeSolve(A @ SAt)
            self._factor = solve.half(SAt.mT).mT  # (B, N, R)
            self._solve = solve
        return self._factor

    @property
    def variance(self) -> Tensor:
        """The exact marginal variances (batch, channels, *grid), dense float64 algebra (grids of
        at most ``DENSE_VARIANCE_MAX_NODES`` nodes per channel; beyond that see
        :meth:`estimate_variance`)."""
        var = self._prior.diag() - self.factor.square().sum(-1)
        var = var.clamp_min(0.0).reshape(self.mean.shape)
        if self._mask is not None:
            var = torch.where(self._mask, var, torch.zeros_like(var))
        return var.to(self._dtype)

    def covariance(self) -> Tensor:
        """The dense posterior covariance (batch, N, N) in the mean's dtype (same size limit)."""
        F = self.factor
        return (self._prior.dense() - F @ F.mT).to(self._dtype)

    def estimate_variance(
        self, probes: int = 64, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Hutchinson's estimate of the marginal variances and its standard error (any size).

        ``diag(Sigma~) = diag(Sigma) - diag(D)`` with ``D = Sigma - Sigma~`` (the downdate of
        all stages): ``diag(D)`` is estimated by ``mean_p z_p * (D z_p)`` over Rademacher probes
        ``z_p`` (one local solve each; unbiased), ``diag(Sigma)`` exactly. Returns
        ``(estimate, standard error)``, each (batch, channels, *grid).
        """
        if isinstance(probes, bool) or not isinstance(probes, int) or probes < 2:
            raise ValueError(f"estimate_variance: probes must be an int >= 2, got {probes!r}.")
        B, N = self._prior.B, self._prior.N
        with torch.no_grad():
            signs = torch.randint(0, 2, (probes, B, N), generator=generator, dtype=F64)
            z = (2 * signs - 1).to(self.mean.device)
            dz = self._prior.mv(z) - self._last.mv(z)
            terms = z * dz
            est = self._prior.diag() - terms.mean(0)
            se = terms.std(0) / math.sqrt(probes)
        est, se = est.reshape(self.mean.shape), se.reshape(self.mean.shape)
        if self._mask is not None:
            est = torch.where(self._mask, est, torch.zeros_like(est))
            se = torch.where(self._mask, se, torch.zeros_like(se))
        return est.to(self._dtype), se.to(self._dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact draws (Matheron's rule: a draw of the prior moved by every stage in the
        covariance metric): (n, batch, channels, *grid); every draw satisfies every row."""
        with torch.no_grad():
            B, N = self._prior.B, self._prior.N
            x = self._m.detach().to(F64).reshape(1, B, N)
            x = x + self._prior.draw(n, generator, self.mean.device)
            x = _run(self._stages, x, self._dtype)
            out = x.reshape(n, *self.mean.shape).to(self._dtype)
            if self._mask is not None:
                out = torch.where(self._mask, out, self.mean.detach())
        return out

    # -------------------------------------------------- the adapters' protocol (dense sizes)
    def exact_root(self, root: Tensor) -> Tensor:
        """A root of the posterior covariance from a root ``X`` of the prior's (*lead, N, K):
        ``X - Sigma A^T K^+ A X`` (float64, dense rows)."""
        F = self.factor
        A, _ = self._dense_rows()
        X = root.to(F64).reshape(self._prior.B, self._prior.N, -1)
        X = X - F @ self._solve.half(A @ X)
        return X.reshape(*self._lead, *X.shape[-2:])

    def _density(self) -> Any:
        from ..conservation.posterior import DegenerateGaussian

        if self._dens is None:
            A, d = self._dense_rows()
            cov = self.covariance().to(F64).reshape(*self._lead, self._prior.N, self._prior.N)
            mean = self.mean.reshape(*self._lead, -1)
            A = A if A.ndim == 2 or A.shape[0] == 1 else A.reshape(*self._lead, *A.shape[-2:])
            A = A[0] if A.ndim == 3 and A.shape[0] == 1 else A
            self._dens = DegenerateGaussian(mean, cov, rows=(A, d.reshape(*self._lead, -1)),
                                            dtype=self._dtype)  # fmt: skip
        return self._dens

    def log_prob(self, x: Tensor) -> Tensor:
        """The density on the rows (see :class:`~constraint_layers.functional.DegenerateGaussian`)
        of ``x`` (..., *lead, N) (the flattened event)."""
        return self._density().log_prob(x)

    def entropy(self) -> Tensor:
        return self._density().entropy()


def _run(stages: Sequence[Any], x: Tensor, dtype: torch.dtype) -> Tensor:
    """Every stage's projection, in order, on ``x`` (rep, B, N) float64."""
    for s in stages:
        x = s.project(x, dtype) if isinstance(s, _RowsStage) else s.project(x, s.f)
    return x


# ----------------------------------------------------------------------------- the entry
def condition_covariance(
    mean: Tensor,
    local: Any,
    walls: Sequence[Any],
    totals: Sequence[Any],
    *,
    covariance: Any = None,
    low_rank: Tensor | None = None,
    variance: Tensor | None = None,
    grid: GridSpec,
    inputs: Any = None,
    lead: Sequence[int] | None = None,
    call: str = "condition_local",
) -> LocalConditioned:
    """Condition ``N(mean, Sigma)`` on the local rows, the walls and the totals (see the module
    docstring). ``mean`` (B, channels, *grid); ``variance`` (B, channels, *grid) or None."""
    from ..boundary.enforce import boundary_rows
    from .project import _dirichlet_only, _walls

    if any(getattr(c, "family", None) == "bounds" for c in totals):
        raise NotImplementedError(
            f"{call}: Gaussian outputs with bounds and local rows are supported with a diagonal "
            "variance and cl.Dirichlet walls (or none), without totals; not yet with a full or "
            "low-rank covariance or other walls."
        )
    shape = tuple(mean.shape)
    B, N = shape[0], math.prod(shape[1:])
    lead = (B,) if lead is None else tuple(lead)
    dev = mean.device
    var = None if variance is None else torch.broadcast_to(variance, shape).reshape(B, N)
    if var is not None and not bool((var.detach() >= 0).all()):
        raise ValueError(f"{call}: the variance holds negative values; expected variances >= 0.")
    prior = Prior.make(B, N, covariance, low_rank, var, call)
    dtype = mean.dtype
    z, mask = mean, None
    stages: list[Any] = []
    parts_all: list[Rows] = []
    if walls:
        if _dirichlet_only(walls):
            z, mask = _walls(mean, walls, grid, inputs, call)
        wrows = boundary_rows(
            shape, list(walls), spacing=grid.spacing, extent=grid.extent,
            endpoint=grid.endpoint, inputs=inputs, include_overridden=False,
        )  # fmt: skip
        wrows = [r for r in wrows if r.num_rows]
        if wrows:
            st = Rows.stack(wrows, B)
            st = st._replace(rhs=st.rhs.to(dev))
            labels = [f"{c!r} row {i}" for c, p in zip(walls, wrows) for i in range(p.num_rows)]
            stages.append(_RowsStage(prior, st, labels, call))
            parts_all.append(st)
    rows = local.rows(shape, grid=grid, inputs=inputs)
    op, f = rows.operator, rows.rhs.to(dev)
    others = bool(stages) and mask is None  # wall rows that are not Dirichlet nodes only
    stages.append(_LocalStage(stages[-1] if stages else prior, op, f, mask, call, others))
    if totals:
        tparts = [c.rows(shape, grid=grid, inputs=inputs) for c in totals]
        st = Rows.stack(tparts, B)
        labels = [f"{c!r} row {i}" for c, p in zip(totals, tparts) for i in range(p.num_rows)]
        st = st._replace(rhs=st.rhs.to(dev))
        stages.append(_RowsStage(stages[-1], st, labels, call))
        parts_all.append(st)

    def dense_rows() -> tuple[Tensor, Tensor]:
        n = op.num_rows
        eye = torch.eye(N, dtype=F64, device=dev).reshape(N, *op.shape)
        C = op.apply(eye).reshape(N, n).T  # (n, N)
        As = [C.expand(B, n, N)]
        ds = [f.reshape(B, n)]
        for p in parts_all:
            a = p.dense(N).to(dev)
            As.append(a.expand(B, *a.shape[-2:]))
            ds.append(p.rhs.to(dev))
        A = torch.cat(As, -2)
        if all(a.ndim == 2 for a in [C] + [p.dense(N) for p in parts_all]):
            A = A[:1]
        return A, torch.cat(ds, -1)

    # the prior's mean, not the wall values: a correlated prior moves the other nodes too
    x = _run(stages, mean.to(F64).reshape(1, B, N), dtype)
    out = x.reshape(shape).to(dtype)
    if mask is not None:  # wall values to the bit
        out = torch.where(mask, out, z)
    return LocalConditioned(out, mean, stages, prior, dense_rows, mask, lead, dtype, call)
