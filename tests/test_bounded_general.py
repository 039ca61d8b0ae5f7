"""The general bounded projection (dense metric, overlapping rows) against the dense
face-enumeration reference and the KKT conditions; rows pinned at an end of their range, a
numerically singular covariance, gradients (issue 13)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_bounded import enumerate_qp

from constraint_layers._engine.bounded import active_bounds, project_bounded

F64 = torch.float64
INF = math.inf


def spd(gen, N):
    A = torch.randn(N, N, generator=gen, dtype=F64)
    return A @ A.T / N + 0.2 * torch.eye(N, dtype=F64)


def rbf(N, ls=0.3, jitter=1e-3):
    """A smooth covariance (far from an M-matrix inverse: hard for the primal-dual method)."""
    x = torch.linspace(0, 1, N, dtype=F64)
    return torch.exp(-0.5 * ((x[:, None] - x[None]) / ls) ** 2) + jitter * torch.eye(N, dtype=F64)


def random_problem(gen, N, M):
    S = spd(gen, N)
    C = torch.randn(M, N, generator=gen, dtype=F64)  # dense rows: they overlap
    u = 2 * torch.randn(N, generator=gen, dtype=F64)
    lo = torch.where(torch.rand(N, generator=gen, dtype=F64) < 0.2, -INF, -0.8)
    hi = torch.where(torch.rand(N, generator=gen, dtype=F64) < 0.2, INF, 0.9)
    target = torch.rand(N, generator=gen, dtype=F64) * 1.6 - 0.8
    return u, C, C @ target, S, lo, hi


def check_kkt(x, u, C, d, S, lo, hi, atol):
    """Rows, bounds, and multipliers of the active bounds with the right sign."""
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    torch.testing.assert_close(C @ x, d, rtol=0, atol=atol)
    act_lo, act_hi = x <= lo, x >= hi
    idx = (act_lo | act_hi).nonzero().squeeze(-1)
    E = torch.cat([C, torch.eye(len(u), dtype=F64)[idx]])
    # x = u - S E^T nu  =>  nu from the first-order conditions (least squares)
    nu = torch.linalg.lstsq((S @ E.T), (u - x).unsqueeze(-1)).solution[:, 0]
    torch.testing.assert_close(S @ E.T @ nu, u - x, rtol=0, atol=1e-8)
    mu = torch.where(act_lo[idx], -nu[C.shape[0] :], nu[C.shape[0] :])
    assert float(mu.min()) >= -1e-8 if mu.numel() else True


@pytest.mark.parametrize("seed", range(8))
def test_matches_face_enumeration_and_kkt(seed):
    gen = torch.Generator().manual_seed(200 + seed)
    u, C, d, S, lo, hi = random_problem(gen, 7, 1 + seed % 3)
    x = project_bounded(u, C, d, covariance=S, lower=lo, upper=hi)
    ref = enumerate_qp(u, C, d, S, lo, hi)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-9)
    check_kkt(x, u, C, d, S, lo, hi, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_larger_problems_many_active(dtype):
    gen = torch.Generator().manual_seed(9)
    N, M = 120, 6
    u, C, d, S, lo, hi = random_problem(gen, N, M)
    x = project_bounded(u.to(dtype), C, d, covariance=S.to(dtype), lower=lo, upper=hi)
    assert x.dtype == dtype
    act = active_bounds(x.to(F64), lo, hi)
    assert int(act.sum()) >= 20  # many active bounds
    assert bool((x >= lo.to(dtype)).all()) and bool((x <= hi.to(dtype)).all())
    if dtype == F64:
        check_kkt(x, u, C, d, S, lo, hi, 1e-11)
    else:  # the algebra runs in float64: the float32 result is its rounding
        ref = project_bounded(u.to(dtype).to(F64), C, d, covariance=S.to(dtype).to(F64),
                              lower=lo, upper=hi)  # fmt: skip
        torch.testing.assert_close(x.to(F64), ref, rtol=0, atol=1e-6)


def test_smooth_covariance_matches_face_enumeration():
    # a smooth (RBF) covariance, far from an M-matrix inverse (a primal-dual search cycles here)
    N = 8
    gen = torch.Generator().manual_seed(69)
    S = rbf(N)
    u = torch.randn(N, generator=gen, dtype=F64)
    C = torch.ones(1, N, dtype=F64) / N
    d = C @ u.clamp_min(0)
    lo = torch.zeros(N, dtype=F64)
    x = project_bounded(u, C, d, covariance=S, lower=0.0)
    ref = enumerate_qp(u, C, d, S, lo, torch.full((N,), INF, dtype=F64))
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-9)
    check_kkt(x, u, C, d, S, lo, torch.full((N,), INF, dtype=F64), 1e-13)


def test_rows_at_the_end_of_their_range_pin_their_entries():
    # a zero total of non-negative values: every entry of the row is 0 (its row and unit rows
    # are dependent; the solvers used to raise "jointly infeasible" here)
    gen = torch.Generator().manual_seed(11)
    N = 8
    S = spd(gen, N)
    C = torch.zeros(2, N, dtype=F64)
    C[0, :4] = 0.25
    C[1, 3:] = 0.2
    u = torch.randn(N, generator=gen, dtype=F64)
    d = torch.tensor([0.0, 0.3], dtype=F64)
    x = project_bounded(u, C, d, covariance=S, lower=0.0)
    assert torch.equal(x[:4], torch.zeros(4, dtype=F64))
    lo, hi = torch.zeros(N, dtype=F64), torch.full((N,), INF, dtype=F64)
    ref = enumerate_qp(u, C, d, S, lo, hi)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(C @ x, d, rtol=0, atol=1e-15)


def test_numerically_singular_covariance_keeps_rows_and_bounds():
    # a GP-like covariance without jitter: PSD only to rounding; the rows and bounds still hold
    T, X = 3, 60
    t = torch.linspace(0, 1, T, dtype=F64)
    x = torch.linspace(0, 1, X, dtype=F64)
    tt, xx = torch.meshgrid(t, x, indexing="ij")
    p = torch.stack([tt.reshape(-1), xx.reshape(-1) / 0.3], -1)
    S = torch.exp(-0.5 * torch.cdist(p, p).square())
    assert float(torch.linalg.eigvalsh(S)[0]) < 1e-12 * float(S.diagonal().max())
    truth = (0.5 - xx + 0.2 * tt).clamp_min(0)
    u = (truth - 0.05 + 0.02 * torch.sin(20 * xx)).reshape(-1)
    w = torch.full((X,), 1.0 / X, dtype=F64)
    C = torch.block_diag(*[w[None]] * T)
    d = C @ truth.reshape(-1)
    out = project_bounded(u, C, d, covariance=S, lower=0.0)
    assert bool((out >= 0).all()) and int((out == 0).sum()) > 0
    torch.testing.assert_close(C @ out, d, rtol=0, atol=1e-15)


def test_gradcheck_overlapping_rows():
    gen = torch.Generator().manual_seed(12)
    N = 9
    S = spd(gen, N)
    C = torch.randn(3, N, generator=gen, dtype=F64)
    u = torch.randn(N, generator=gen, dtype=F64)
    d = C @ (0.7 * u.clamp(-0.6, 0.8))
    x0 = project_bounded(u, C, d, covariance=S, lower=-0.6, upper=0.8)
    act = active_bounds(x0, -0.6, 0.8)
    assert bool(act.any()) and not bool(act.all())

    def fn(u, d, S):
        return project_bounded(u, C, d, covariance=0.5 * (S + S.T), lower=-0.6, upper=0.8)

    args = (u.requires_grad_(), d.requires_grad_(), S.requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-6)
