"""The Gaussian record adapters read and write, input validation, and the prior structures
(diagonal, low rank, dense: one small class each) the conditioning works with (private)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .._tolerance import SYMMETRY_RTOL

__all__ = ["Gaussian"]

F64 = torch.float64
METRICS = ("covariance", "euclidean")


class Gaussian(NamedTuple):
    """A Gaussian model output as adapters hand it to the conservation layer (and get it back).

    ``Sigma = diag(variance) + low_rank @ low_rank^T``, or ``covariance`` when given; a posterior
    coming back from the layer may add ``downdate``: ``Sigma~ = covariance - downdate downdate^T``
    (so that a lazy covariance stays lazy). A deterministic output has neither variance nor
    covariance.
    """

    mean: Tensor  # shape: (*batch, *event)
    variance: Tensor | None = None  # shape: (*batch, *event); the diagonal (part) of Sigma
    covariance: Any = None  # shape: (*batch, N, N), N = prod(event); a Tensor or linear operator
    low_rank: Tensor | None = None  # shape: (*batch, N, K)
    downdate: Tensor | None = None  # shape: (*batch, N, M); posteriors of a covariance only
    event_ndim: int = 1
    #: The structured posterior (a :class:`ConstrainedGaussian` over the flattened event, in the
    #: record's units) when the layer formed one: adapters build exact sampling roots and the
    #: degenerate density from it. None for inputs and for diagonal fast paths.
    conditioned: Any = None


# ------------------------------------------------------------------------------- validation
def _float_tensor(x: object, name: str, call: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{call}: {name} must be a torch.Tensor, got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"{call}: {name} must be a floating-point tensor, got dtype {x.dtype}. Convert it "
            "with .double() or .float()."
        )
    return x


def _check_matrix(G: object, n: int, call: str) -> tuple[Tensor, bool]:
    """``G`` as ``(*batch, M, N)`` (``(N,)`` is one row); returns (G, single_row)."""
    if not isinstance(G, Tensor):
        raise TypeError(
            f"{call}: G must be a tensor of shape (M, N) or (*batch, M, N) (or (N,) for one row), "
            f"got {type(G).__name__}."
        )
    if not (G.is_floating_point() or G.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{call}: G must hold real numbers, got dtype {G.dtype}.")
    single = G.ndim == 1
    if single:
        G = G.unsqueeze(0)
    if G.ndim < 2 or G.shape[-1] != n:
        raise ValueError(
            f"{call}: G must have one column per output point: expected shape (M, {n}) or "
            f"(*batch, M, {n}) for a mean with {n} points in its last axis, got G of shape "
            f"{tuple(G.shape if not single else G.shape[1:])}. Flatten the output's event axes "
            "(C order) to match, or build G with cl.Conservation.integral."
        )
    return G, single


def _check_rhs(b: object, single: bool, m: int, call: str) -> Tensor:
    """``b`` as a float64 tensor broadcastable to ``(*batch, M)``."""
    if isinstance(b, bool) or not isinstance(b, (int, float, Tensor)):
        raise TypeError(
            f"{call}: b must be a number or a tensor of shape (*batch, M), got {type(b).__name__}."
        )
    bt = torch.as_tensor(b)
    if not bt.is_floating_point():
        bt = bt.to(F64)
    if single and bt.ndim >= 1 and bt.shape[-1] != 1:
        bt = bt.unsqueeze(-1)  # one row: b of shape (*batch,)
    elif single and bt.ndim == 0:
        bt = bt.reshape(1)
    if bt.ndim == 0:
        return bt.to(F64).expand(m)
    if bt.shape[-1] not in (1, m):
        shape = "(*batch,)" if single else f"(*batch, {m})"
        raise ValueError(
            f"{call}: b must hold one value per constraint row: expected shape {shape} (or a "
            f"number), got b of shape {tuple(torch.as_tensor(b).shape)} for G with {m} row(s)."
        )
    return bt.to(F64)


def _check_noise(noise: object, m: int, call: str) -> Tensor | None:
    """Constraint noise (std) as float64 ``(*batch, M)``, or None when it is zero."""
    if type(noise) in (int, float) and noise == 0:
        return None
    if isinstance(noise, bool) or not isinstance(noise, (int, float, Tensor)):
        raise TypeError(
            f"{call}: noise must be a number or a tensor of shape (M,) or (*batch, M) (standard "
            f"deviations), got {type(noise).__name__}."
        )
    nt = noise if isinstance(noise, Tensor) else torch.tensor(float(noise), dtype=F64)
    if nt.ndim and nt.shape[-1] not in (1, m):
        raise ValueError(
            f"{call}: noise must be a number or hold one standard deviation per constraint row "
            f"(last axis {m}), got shape {tuple(nt.shape)}."
        )
    ndet = nt.detach()
    if bool(torch.isnan(ndet).any()) or bool((ndet < 0).any()):
        raise ValueError(
            f"{call}: noise must be non-negative standard deviations (inf allowed: the row is "
            f"ignored), got {ndet.flatten()[:8].tolist()}."
        )
    if not nt.requires_grad and bool((ndet == 0).all()):
        return None
    nt = nt.to(F64)
    return nt.reshape(1).expand(m) if nt.ndim == 0 else nt


def _check_variance(var: Tensor, name: str, call: str) -> None:
    """One pass: NaN propagates through ``aminmax``; negative values show up in the min, inf in
    the max."""
    if var.numel() == 0:
        return
    low, high = (float(v) for v in torch.aminmax(var.detach()))
    if not (low >= 0 and math.isfinite(high)):
        what = "NaN" if math.isnan(low) else f"a negative value ({low:.3e})"
        what = what if not low >= 0 else f"an infinite value ({high})"
        raise ValueError(
            f"{call}: {name} must be non-negative and finite, but it holds {what}. Pass "
            "variances (squared standard deviations), not log-variances; check the model's head."
        )


def _check_covariance(cov: Tensor, call: str) -> None:
    """O(N) checks of a dense covariance: square, finite non-negative diagonal. (Symmetry is
    probed inside the product ``Sigma G^T``, see :meth:`_Dense.cross_checked`.)"""
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise ValueError(
            f"{call}: covariance must be square, shape (*batch, N, N); got {tuple(cov.shape)}."
        )
    _check_variance(cov.detach().diagonal(dim1=-2, dim2=-1), "the covariance's diagonal", call)


def _probe_symmetry(SV: Tensor, V: Tensor, dtype: torch.dtype, call: str) -> None:
    """``v^T (S w)`` against ``w^T (S v)`` for two random probes: a cheap symmetry test that
    costs two extra columns in the product ``S [G^T, v, w]``."""
    v, w = V[:, 0], V[:, 1]
    Sv, Sw = SV[..., 0].detach(), SV[..., 1].detach()
    gap = ((Sw * v).sum(-1) - (Sv * w).sum(-1)).abs()
    scale = v.norm() * (Sw.norm(dim=-1) + Sv.norm(dim=-1)) + torch.finfo(SV.dtype).tiny
    ratio = float((gap / scale).amax())
    if not ratio <= SYMMETRY_RTOL.get(dtype, 1e-5):
        raise ValueError(
            f"{call}: covariance must be symmetric, but a random probe finds "
            f"|v^T (S - S^T) w| = {ratio:.2e} relative to |v| |S w| (tolerance "
            f"{SYMMETRY_RTOL.get(dtype, 1e-5):.0e} for {dtype}). Symmetrise it, e.g. "
            "0.5 * (S + S.mT)."
        )


# ---------------------------------------------------------------------------------- priors
class _Prior:
    """Sigma in one of its structured forms; every method returns float64."""

    batch_shape: torch.Size

    def cross(self, Gt: Tensor) -> Tensor:  # Gt: (*b, N, M) -> Sigma Gt: (*b, N, M)
        raise NotImplementedError

    def diag(self) -> Tensor:  # (*b, N)
        raise NotImplementedError

    def dense(self) -> Tensor:  # (*b, N, N)
        raise NotImplementedError

    def draw(self, shape: Sequence[int], n: int, generator: Any) -> Tensor:
        """Zero-mean samples of N(0, Sigma): shape (*shape, N) (shape ends with the batch)."""
        raise NotImplementedError


def _randn(shape, generator, device) -> Tensor:
    return torch.randn(*shape, dtype=F64, device=device, generator=generator)


class _Diag(_Prior):
    def __init__(self, d: Tensor) -> None:
        self.d = d  # (*b, N), any float dtype
        self.batch_shape = d.shape[:-1]

    def cross(self, Gt):
        return self.d.to(F64).unsqueeze(-1) * Gt

    def diag(self):
        return self.d.to(F64)

    def dense(self):
        return torch.diag_embed(self.d.to(F64))

    def draw(self, shape, n, generator):
        return _randn((*shape, n), generator, self.d.device) * self.d.to(F64).sqrt()


class _LowRank(_Prior):
    def __init__(self, d: Tensor | None, L: Tensor) -> None:
        self.d, self.L = d, L  # (*b, N) or None; (*b, N, K)
        shapes = [L.shape[:-2]] + ([] if d is None else [d.shape[:-1]])
        self.batch_shape = torch.broadcast_shapes(*shapes)

    def cross(self, Gt):
        L = self.L.to(F64)
        out = L @ (L.mT @ Gt)
        return out if self.d is None else out + self.d.to(F64).unsqueeze(-1) * Gt

    def diag(self):
        v = self.L.to(F64).square().sum(-1)
        return v if self.d is None else v + self.d.to(F64)

    def dense(self):
        L = self.L.to(F64)
        out = L @ L.mT
        return out if self.d is None else out + torch.diag_embed(self.d.to(F64))

    def draw(self, shape, n, generator):
        L = self.L.to(F64)
        eta = _randn((*shape, L.shape[-1], 1), generator, L.device)
        out = (L @ eta).squeeze(-1)
        if self.d is not None:
            out = out + _randn((*shape, n), generator, L.device) * self.d.to(F64).sqrt()
        return out


class _Dense(_Prior):
    def __init__(self, S: Any) -> None:
        self.S = S  # (*b, N, N): a tensor, or a linear operator (matmul, diagonal, to_dense)
        self.batch_shape = torch.Size(S.shape[:-2])
        self.lazy = not isinstance(S, Tensor)
        #: A model's covariance (a linear operator, or one evaluated from it): an inaccurate one
        #: is repaired with a warning; a caller's own tensor raises instead.
        self.from_model = self.lazy
        self._diag: Tensor | None = None

    def cross(self, Gt):
        if self.lazy:
            return self.S.matmul(Gt.to(self.S.dtype)).to(F64)
        return (self.S @ Gt.to(self.S.dtype)).to(F64)

    def cross_checked(self, Gt: Tensor, call: str) -> Tensor:
        """``Sigma G^T``, with the symmetry probe riding along (dense tensors only)."""
        if self.lazy:
            return self.cross(Gt)
        n = Gt.shape[-2]
        gen = torch.Generator(device=self.S.device).manual_seed(0)
        V = torch.randn(n, 2, dtype=self.S.dtype, device=self.S.device, generator=gen)
        Gt = Gt.to(self.S.dtype)
        out = self.S @ torch.cat([Gt, V.expand(*Gt.shape[:-2], n, 2)], dim=-1)
        _probe_symmetry(out[..., -2:], V, self.S.dtype, call)
        return out[..., :-2].to(F64)

    def diag(self):
        if self._diag is None:  # a lazy operator's diagonal can cost O(N K): compute it once
            self._diag = self.S.diagonal(dim1=-2, dim2=-1).to(F64)
        return self._diag

    def dense(self):
        return (self.S.to_dense() if self.lazy else self.S).to(F64)

    def draw(self, shape, n, generator):
        S = self.dense()
        root, info = torch.linalg.cholesky_ex(S)
        if bool((info != 0).any()):  # positive semidefinite but singular: the symmetric root
            from .linalg import psd_root  # (linalg imports this module)

            root = psd_root(S)
        eps = _randn((*shape, n, 1), generator, S.device)
        return (root @ eps).squeeze(-1)


def _make_prior(variance, covariance, low_rank, n: int, call: str) -> _Prior | None:
    if covariance is not None:
        if variance is not None or low_rank is not None:
            raise ValueError(
                f"{call}: give the uncertainty once: variance= (diagonal), variance= with "
                "low_rank= (diagonal plus low rank), or covariance= (full); got covariance= "
                "together with another."
            )
        if isinstance(covariance, Tensor):
            _float_tensor(covariance, "covariance", call)
            _check_covariance(covariance, call)
        elif not all(hasattr(covariance, a) for a in ("matmul", "diagonal", "to_dense", "shape")):
            raise TypeError(
                f"{call}: covariance must be a tensor of shape (*batch, N, N) or a linear operator "
                f"(with matmul, diagonal, to_dense), got {type(covariance).__name__}."
            )
        if tuple(covariance.shape[-2:]) != (n, n):
            raise ValueError(
                f"{call}: covariance must have shape (*batch, {n}, {n}) for a mean with {n} "
                f"points, got {tuple(covariance.shape)}."
            )
        return _Dense(covariance)
    if variance is not None:
        _float_tensor(variance, "variance", call)
        if variance.ndim == 0 or variance.shape[-1] not in (1, n):
            raise ValueError(
                f"{call}: variance must have shape (*batch, {n}) (broadcastable to the mean), "
                f"got {tuple(variance.shape)}."
            )
    if low_rank is not None:
        _float_tensor(low_rank, "low_rank", call)
        if low_rank.ndim < 2 or low_rank.shape[-2] != n:
            raise ValueError(
                f"{call}: low_rank must have shape (*batch, {n}, K) (Sigma = diag(variance) + "
                f"L L^T), got {tuple(low_rank.shape)}."
            )
        return _LowRank(variance, low_rank)
    if variance is not None:
        return _Diag(variance)
    return None
