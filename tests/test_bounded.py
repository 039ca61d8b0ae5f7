"""The bounded projection (equality rows + box bounds): exact against dense float64 references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from constraint_layers._engine.bounded import active_bounds, project_bounded, project_bounded_rows
from constraint_layers.errors import ConstraintError
from constraint_layers.functional import condition_gaussian

F64 = torch.float64
INF = math.inf


# ------------------------------------------------------------------------------ references
def enumerate_qp(u, C, d, W, lo, hi):
    """Exact reference for tiny N: every face of the box (each entry free, at its lower or at its
    upper bound); the solution is the feasible face projection of least objective."""
    u, C, d, W = (np.asarray(t, dtype=np.float64) for t in (u, C, d, W))
    lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    N = u.shape[0]
    Winv = np.linalg.inv(W)
    best, best_obj = None, INF
    for face in itertools.product((0, 1, 2), repeat=N):
        rows, vals = [C[m] for m in range(C.shape[0])], list(d)
        skip = False
        for i, f in enumerate(face):
            if f:
                b = lo[i] if f == 1 else hi[i]
                if not np.isfinite(b):
                    skip = True
                    break
                e = np.zeros(N)
                e[i] = 1.0
                rows.append(e)
                vals.append(b)
        if skip:
            continue
        x = u.copy()
        if rows:
            E, e = np.array(rows), np.array(vals)
            A = E @ W @ E.T
            nu = np.linalg.lstsq(A, E @ u - e, rcond=None)[0]
            x = u - W @ E.T @ nu
            if np.abs(E @ x - e).max() > 1e-9 * (1 + np.abs(e).max()):
                continue
        if (x < lo - 1e-9).any() or (x > hi + 1e-9).any():
            continue
        obj = (x - u) @ Winv @ (x - u)
        if obj < best_obj - 1e-12:
            best, best_obj = x, obj
    return best


def block_rows(c):
    """The dense (M, M n) block-diagonal matrix of separable rows c: (M, n)."""
    M, n = c.shape
    C = torch.zeros(M, M * n, dtype=c.dtype)
    for m in range(M):
        C[m, m * n : (m + 1) * n] = c[m]
    return C


def random_rows(gen, batch, M, n, *, dtype=F64, margin=0.3, fixed=False):
    """A feasible separable problem with bounds that are active on some entries."""
    u = torch.randn(*batch, M, n, generator=gen, dtype=F64)
    c = torch.rand(*batch, M, n, generator=gen, dtype=F64) + 0.2
    w = torch.rand(*batch, M, n, generator=gen, dtype=F64) + 0.1
    if fixed:
        w = torch.where(torch.rand(w.shape, generator=gen, dtype=F64) < 0.2, 0.0, w)
    lo = torch.where(torch.rand(u.shape, generator=gen, dtype=F64) < 0.2, -INF, -0.6)
    hi = torch.where(torch.rand(u.shape, generator=gen, dtype=F64) < 0.2, INF, 0.7)
    target = torch.where(w > 0, torch.rand(u.shape, generator=gen, dtype=F64) * 1.2 - 0.5, u)
    target = torch.minimum(torch.maximum(target, lo + margin * 0), hi)
    u = torch.where(w > 0, u, target)  # fixed entries lie in their bounds
    d = (c * target).sum(-1)
    cast = (lambda t: t.to(dtype)) if dtype != F64 else (lambda t: t)
    return cast(u), cast(c), cast(d), cast(w), cast(lo), cast(hi)


# ---------------------------------------------------------------------- separable path
@pytest.mark.parametrize("seed", range(12))
def test_rows_match_face_enumeration(seed):
    gen = torch.Generator().manual_seed(seed)
    u, c, d, w, lo, hi = random_rows(gen, (2,), 3, 5, fixed=seed % 3 == 0)
    x = project_bounded_rows(u, c, d, weight=w, lower=lo, upper=hi)
    for b in range(2):
        for m in range(3):
            wm = w[b, m]
            free = wm > 0
            ref = u[b, m].numpy().copy()
            # fixed entries: substitute them out (the reference needs W invertible)
            rest = float(d[b, m] - (c[b, m] * u[b, m])[~free].sum())
            ref_free = enumerate_qp(
                u[b, m][free],
                c[b, m][free][None],
                [rest],
                np.diag(wm[free].numpy()),
                lo[b, m][free],
                hi[b, m][free],
            )
            ref[free.numpy()] = ref_free
            np.testing.assert_allclose(x[b, m].numpy(), ref, rtol=0, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.sampled_from([(), (1,), (3,), (2, 2)]),
    M=st.integers(1, 4),
    n=st.integers(1, 9),
    fixed=st.booleans(),
)
def test_rows_exact_and_equal_to_general_and_sorted_paths(seed, batch, M, n, fixed):
    gen = torch.Generator().manual_seed(seed)
    u, c, d, w, lo, hi = random_rows(gen, batch, M, n, fixed=fixed)
    x = project_bounded_rows(u, c, d, weight=w, lower=lo, upper=hi)
    assert x.shape == u.shape and x.dtype == F64
    scale = (c * x).abs().sum(-1) + d.abs()
    assert ((c * x).sum(-1) - d).abs().max() <= 1e-10 * scale.max()
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    assert torch.equal(x[w == 0], u[w == 0])  # fixed entries do not move
    # the exact breakpoint search gives the same point
    xs = project_bounded_rows(u, c, d, weight=w, lower=lo, upper=hi, _force_sort=True)
    torch.testing.assert_close(xs, x, rtol=0, atol=1e-10)
    # the general active-set path on the block-diagonal rows gives the same point
    for idx in itertools.product(*(range(k) for k in batch)):
        xg = project_bounded(
            u[idx].reshape(-1),
            block_rows(c[idx]),
            d[idx],
            weight=w[idx].reshape(-1),
            lower=lo[idx].reshape(-1),
            upper=hi[idx].reshape(-1),
        )
        torch.testing.assert_close(xg.reshape(M, n), x[idx], rtol=0, atol=1e-9)


def test_inactive_bounds_equal_the_equality_only_projection():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4, 3, 6, generator=gen, dtype=F64)
    c = torch.rand(6, generator=gen, dtype=F64) + 0.5
    w = torch.rand(4, 3, 6, generator=gen, dtype=F64) + 0.1
    d = (c * u).sum(-1) + 0.1 * torch.randn(4, 3, generator=gen, dtype=F64)
    C = block_rows(c.expand(3, 6))
    for weight, kwargs in ((w, {"variance": w.reshape(4, 18)}), (None, {})):
        x = project_bounded_rows(u, c, d, weight=weight, lower=-50.0, upper=50.0)
        ref = condition_gaussian(u.reshape(4, 18), C, d, **kwargs).mean.reshape(4, 3, 6)
        torch.testing.assert_close(x, ref, rtol=0, atol=1e-13)
        Wm = torch.eye(18, dtype=F64) if weight is None else None
        for b in range(4):  # the dense float64 formula u - W C^T (C W C^T)^-1 (C u - d)
            W = torch.diag(w[b].reshape(-1)) if weight is not None else Wm
            ub = u[b].reshape(-1)
            dense = ub - W @ C.T @ torch.linalg.solve(C @ W @ C.T, C @ ub - d[b])
            torch.testing.assert_close(x[b].reshape(-1), dense, rtol=0, atol=1e-13)
            xg = project_bounded(ub, C, d[b], covariance=W, lower=-50.0, upper=50.0)
            torch.testing.assert_close(xg, dense, rtol=0, atol=1e-13)


def test_ties_zero_slope_and_long_rows():
    # PME-like: many values exactly at the lower bound; a row entirely below it (zero slope at
    # the start); one row longer than a cache block (the chunked evaluation)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(3, 50, generator=gen, dtype=F64).clamp_min(0)
    u[1] = -1.0 - torch.rand(50, generator=gen, dtype=F64)
    c = torch.full((50,), 0.02, dtype=F64)
    d = torch.tensor([0.3, 0.4, 0.0], dtype=F64)
    x = project_bounded_rows(u, c, d, lower=0.0)
    torch.testing.assert_close((c * x).sum(-1), d, rtol=0, atol=1e-14)
    assert bool((x >= 0).all())
    xs = project_bounded_rows(u, c, d, lower=0.0, _force_sort=True)
    torch.testing.assert_close(x, xs, rtol=0, atol=1e-13)
    n = 100_000
    ul = torch.randn(1, n, generator=gen, dtype=F64)
    cl_ = torch.full((n,), 1.0 / n, dtype=F64)
    wl = torch.rand(1, n, generator=gen, dtype=F64)
    xl = project_bounded_rows(ul, cl_, 0.3, weight=wl, lower=0.0, upper=1.5)
    assert abs(float((cl_ * xl).sum()) - 0.3) <= 1e-13
    assert bool((xl >= 0).all()) and bool((xl <= 1.5).all())
    xls = project_bounded_rows(ul, cl_, 0.3, weight=wl, lower=0.0, upper=1.5, _force_sort=True)
    torch.testing.assert_close(xl, xls, rtol=0, atol=1e-12)


def test_float32_and_broadcast_shapes():
    gen = torch.Generator().manual_seed(3)
    u, c, d, w, _, _ = random_rows(gen, (5,), 4, 30, dtype=torch.float32)
    x = project_bounded_rows(u, c[0, 0], d, weight=w, lower=-0.6, upper=0.7)
    assert x.dtype == torch.float32 and x.shape == (5, 4, 30)
    d_ = d.to(F64)
    res = ((c[0, 0].to(F64) * x.to(F64)).sum(-1) - d_).abs()
    assert float((res / (c[0, 0].to(F64) * x.to(F64)).abs().sum(-1)).max()) <= 1e-5
    assert bool((x >= -0.6).all()) and bool((x <= 0.7).all())  # in float32, exactly
    # a float64 weight promotes the result; a per-row total of shape (M,) broadcasts
    x64 = project_bounded_rows(u, c[0, 0], d[0], weight=w.to(F64), lower=-0.6)
    assert x64.dtype == F64 and x64.shape == (5, 4, 30)
    # empty batch, empty rows
    e = project_bounded_rows(torch.zeros(0, 3, 4), torch.ones(4), 0.0, lower=0.0)
    assert e.shape == (0, 3, 4)
    e2 = project_bounded_rows(torch.zeros(2, 3, 0), torch.ones(0), 0.0, lower=0.0)
    assert e2.shape == (2, 3, 0)


def test_inputs_are_not_modified():
    gen = torch.Generator().manual_seed(4)
    args = random_rows(gen, (2,), 3, 6)
    copies = [t.clone() for t in args]
    u, c, d, w, lo, hi = args
    project_bounded_rows(u, c, d, weight=w, lower=lo, upper=hi)
    project_bounded(
        u[0].reshape(-1),
        block_rows(c[0]),
        d[0],
        weight=w[0].reshape(-1),
        lower=lo[0].reshape(-1),
        upper=hi[0].reshape(-1),
    )
    for a, b in zip(args, copies):
        assert torch.equal(a, b)


def test_gradients_rows_gradcheck():
    # away from kinks: margins between every value and its bounds
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(2, 3, 6, generator=gen, dtype=F64)
    c = torch.rand(3, 6, generator=gen, dtype=F64) + 0.5
    w = torch.rand(2, 3, 6, generator=gen, dtype=F64) + 0.2
    x0 = project_bounded_rows(u, c, (c * u).sum(-1) - 0.4, weight=w, lower=-0.5, upper=0.8)
    act = active_bounds(x0, -0.5, 0.8)
    assert bool(act.any()) and not bool(act.all())
    lo = torch.full((2, 3, 6), -0.5, dtype=F64, requires_grad=True)
    hi = torch.full((2, 3, 6), 0.8, dtype=F64, requires_grad=True)
    d = ((c * u).sum(-1) - 0.4).requires_grad_()
    args = (u.requires_grad_(), c.requires_grad_(), d, w.requires_grad_(), lo, hi)

    def fn(u, c, d, w, lo, hi):
        return project_bounded_rows(u, c, d, weight=w, lower=lo, upper=hi)

    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-6)


def test_gradients_dense_gradcheck():
    gen = torch.Generator().manual_seed(6)
    N = 7
    A = torch.randn(N, N, generator=gen, dtype=F64)
    S = (A @ A.T + N * torch.eye(N, dtype=F64)) / N
    C = torch.randn(2, N, generator=gen, dtype=F64)
    u = torch.randn(N, generator=gen, dtype=F64)
    d = C @ (0.8 * u.clamp(-0.7, 0.9))  # a point inside the box satisfies the rows
    x0 = project_bounded(u, C, d, covariance=S, lower=-0.7, upper=0.9)
    assert bool(active_bounds(x0, -0.7, 0.9).any())

    def fn(u, d, S):
        return project_bounded(u, C, d, covariance=0.5 * (S + S.T), lower=-0.7, upper=0.9)

    args = (u.requires_grad_(), d.requires_grad_(), S.requires_grad_())
    assert torch.autograd.gradcheck(fn, args, eps=1e-7, atol=1e-6)


# ------------------------------------------------------------------------- general path
@pytest.mark.parametrize("seed", range(10))
def test_dense_matches_face_enumeration(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    N, M = 6, 1 + seed % 3
    A = torch.randn(N, N, generator=gen, dtype=F64)
    S = A @ A.T + 0.3 * torch.eye(N, dtype=F64)
    C = torch.randn(M, N, generator=gen, dtype=F64)
    u = 2 * torch.randn(N, generator=gen, dtype=F64)
    lo = torch.where(torch.rand(N, generator=gen, dtype=F64) < 0.25, -INF, -0.8)
    hi = torch.where(torch.rand(N, generator=gen, dtype=F64) < 0.25, INF, 0.9)
    target = torch.rand(N, generator=gen, dtype=F64) * 1.6 - 0.8
    d = C @ target
    x = project_bounded(u, C, d, covariance=S, lower=lo, upper=hi)
    ref = enumerate_qp(u, C, d, S, lo, hi)
    np.testing.assert_allclose(x.numpy(), ref, rtol=0, atol=1e-9)
    assert bool((x >= lo).all()) and bool((x <= hi).all())
    torch.testing.assert_close(C @ x, d, rtol=0, atol=1e-10)


def test_dense_matches_scipy_slsqp():
    from scipy.optimize import minimize

    gen = torch.Generator().manual_seed(7)
    N, M = 20, 3
    A = torch.randn(N, N, generator=gen, dtype=F64)
    S = A @ A.T / N + 0.2 * torch.eye(N, dtype=F64)
    C = torch.randn(M, N, generator=gen, dtype=F64)
    u = torch.randn(2, N, generator=gen, dtype=F64)
    d = (C @ (0.5 * torch.rand(2, N, generator=gen, dtype=F64)).T).T
    x = project_bounded(u, C, d, covariance=S, lower=0.0, upper=1.0)
    Si = np.linalg.inv(S.numpy())
    for b in range(2):
        ub = u[b].numpy()
        res = minimize(
            lambda z, ub=ub: (z - ub) @ Si @ (z - ub),
            np.clip(ub, 0, 1),
            jac=lambda z, ub=ub: 2 * Si @ (z - ub),
            method="SLSQP",
            bounds=[(0.0, 1.0)] * N,
            constraints=[
                {
                    "type": "eq",
                    "fun": lambda z, b=b: C.numpy() @ z - d[b].numpy(),
                    "jac": lambda z: C.numpy(),
                }
            ],
            options={"ftol": 1e-15, "maxiter": 500},
        )
        np.testing.assert_allclose(x[b].numpy(), res.x, rtol=0, atol=1e-6)


def test_dense_weight_identity_and_batch():
    gen = torch.Generator().manual_seed(8)
    u = torch.randn(3, 2, 5, generator=gen, dtype=torch.float32)
    C = torch.ones(1, 5)
    x = project_bounded(u, C, torch.zeros(3, 2, 1), lower=-0.4)
    assert x.shape == (3, 2, 5) and x.dtype == torch.float32
    assert bool((x >= -0.4).all())
    assert float((x.to(F64) @ C.to(F64).T).abs().max()) <= 1e-6
    ref = project_bounded_rows(u, torch.ones(5), 0.0, lower=-0.4)
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    assert project_bounded(torch.zeros(0, 5), C, 0.0).shape == (0, 5)


# ------------------------------------------------------------------------------- errors
def test_infeasible_rows_raise_naming_rows_and_numbers():
    u = torch.zeros(2, 3, 4, dtype=F64)
    c = torch.ones(4, dtype=F64)
    d = torch.ones(2, 3, dtype=F64)
    d[1, 2] = -1.0  # below 4 * lower = 0
    with pytest.raises(ConstraintError, match=r"row \(1, 2\).*-1.*\[0, 4\]"):
        project_bounded_rows(u, c, d, lower=0.0, upper=1.0)
    # a row whose entries are all fixed, with the wrong total
    w = torch.ones(2, 3, 4, dtype=F64)
    w[0, 1] = 0.0
    with pytest.raises(ConstraintError, match=r"row \(0, 1\).*requested total 1.*\[0, 0\]"):
        project_bounded_rows(u, c, d.clamp_min(0), weight=w, lower=-1.0, upper=1.0)
    # a fixed entry outside its bounds
    u2 = u.clone()
    u2[0, 1, 2] = -3.0
    with pytest.raises(ConstraintError, match="zero weight"):
        project_bounded_rows(u2, c, d.clamp_min(0), weight=w, lower=-1.0, upper=1.0)
    # the general path
    C = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]], dtype=F64)
    with pytest.raises(ConstraintError, match=r"row \(1,\).*requested total 5"):
        project_bounded(torch.zeros(3, dtype=F64), C, torch.tensor([1.0, 5.0]), upper=1.0)
    # jointly infeasible although each row alone is feasible: x0 + x1 = 2, x1 + x2 = 0, x <= 1,
    # x >= 0 forces x1 = 1 and x1 = 0
    with pytest.raises(ConstraintError, match="jointly"):
        project_bounded(
            torch.zeros(3, dtype=F64), C, torch.tensor([2.0, 0.0]), lower=0.0, upper=1.0
        )


def test_bad_input_errors():
    u = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        project_bounded_rows(u, torch.ones(3), 0.0, lower=torch.ones(3), upper=torch.zeros(3))
    with pytest.raises(ValueError, match="negative"):
        project_bounded_rows(u, torch.ones(3), 0.0, weight=-torch.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        project_bounded_rows(u.clone().fill_(math.nan), torch.ones(3), 0.0, lower=0.0)
    with pytest.raises(ValueError, match="NaN"):
        project_bounded_rows(u, torch.ones(3), 0.0, lower=torch.tensor([0.0, math.nan, 0.0]))
    with pytest.raises(TypeError, match="floating"):
        project_bounded_rows(torch.zeros(2, 3, dtype=torch.long), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match=r"\(\*batch, M, n\)"):
        project_bounded_rows(torch.zeros(3), torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="broadcast"):
        project_bounded_rows(u, torch.ones(4), 0.0)
    with pytest.raises(ValueError, match="not both"):
        project_bounded(u, torch.ones(1, 3), 0.0, weight=torch.ones(3), covariance=torch.eye(3))


def test_active_bounds():
    x = project_bounded_rows(
        torch.tensor([[2.0, -1.0, 0.5, 0.2]]), torch.ones(4), 1.5, lower=0.0, upper=1.0
    )
    assert active_bounds(x, 0.0, 1.0).tolist() == [[True, True, False, False]]
    assert active_bounds(x).sum() == 0
