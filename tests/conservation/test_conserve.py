"""conserve(): the Gaussian update against dense float64 references and the KKT solution."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import constraint_layers as cl
from constraint_layers._engine import gaussian as ops
from constraint_layers.testing import dense_update

F64 = torch.float64
TOL = 1e-10


def problem(n=40, m=3, batch=(4,), seed=0, per_sample=False):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*batch, n, dtype=F64, generator=g)
    var = torch.rand(*batch, n, dtype=F64, generator=g) + 0.05
    G = torch.randn(*((batch if per_sample else ()) + (m, n)), dtype=F64, generator=g)
    b = torch.randn(*batch, m, dtype=F64, generator=g)
    return mu, var, G, b


def spd(batch, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(*batch, n, n + 3, dtype=F64, generator=g)
    return X @ X.mT / n + 0.1 * torch.eye(n, dtype=F64)


def kkt(mu, S, G, b):
    """min (u - mu)^T S^{-1} (u - mu) s.t. G u = b, from the KKT system (one sample)."""
    n, m = mu.shape[-1], G.shape[-2]
    K = torch.zeros(n + m, n + m, dtype=F64)
    Si = torch.linalg.inv(S)
    K[:n, :n], K[:n, n:], K[n:, :n] = Si, G.mT, G
    rhs = torch.cat([Si @ mu, b])
    return torch.linalg.solve(K, rhs)[:n]


@pytest.mark.parametrize("per_sample", [False, True])
def test_diagonal_matches_dense_reference(per_sample):
    mu, var, G, b = problem(per_sample=per_sample)
    post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    ref_mean, ref_cov = dense_update(mu, G, b, variance=var)
    torch.testing.assert_close(post.mean, ref_mean, rtol=TOL, atol=TOL)
    torch.testing.assert_close(
        post.variance, ref_cov.diagonal(dim1=-2, dim2=-1), rtol=TOL, atol=TOL
    )
    torch.testing.assert_close(post.covariance(), ref_cov, rtol=TOL, atol=TOL)


def test_matches_kkt_solution():
    mu, var, G, b = problem(n=25, m=4, batch=(3,))
    S = spd((3,), 25)
    for post, cov in [
        (cl.functional.condition_gaussian(mu, G, b, variance=var), torch.diag_embed(var)),
        (cl.functional.condition_gaussian(mu, G, b, covariance=S), S),
    ]:
        for i in range(3):
            torch.testing.assert_close(
                post.mean[i], kkt(mu[i], cov[i], G, b[i]), rtol=TOL, atol=TOL
            )


def test_exact_at_zero_noise_and_posterior_rank():
    mu, var, G, b = problem(n=60, m=5)
    post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    torch.testing.assert_close(post.mean @ G.mT, b, rtol=0, atol=1e-12)
    gsg = G @ post.covariance() @ G.mT
    assert float(gsg.abs().max()) < 1e-12
    post = cl.functional.condition_gaussian(mu, G, b, covariance=spd((4,), 60))
    assert float((G @ post.covariance() @ G.mT).abs().max()) < 1e-12


def test_noise_limits():
    mu, var, G, b = problem()
    for noise in (1e-9, 0.3, torch.tensor([0.1, 1.0, 10.0])):
        post = cl.functional.condition_gaussian(mu, G, b, variance=var, noise=noise)
        s = torch.as_tensor(noise, dtype=F64)
        ref_mean, ref_cov = dense_update(mu, G, b, variance=var)  # noise 0 for the shape
        A = G @ torch.diag_embed(var) @ G.mT + torch.diag_embed(s.expand(3) ** 2)
        K = torch.linalg.solve(A, G * var.unsqueeze(-2)).mT
        ref = mu - (K @ (mu @ G.mT - b).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(post.mean, ref, rtol=TOL, atol=TOL)
        del ref_mean, ref_cov
    big = cl.functional.condition_gaussian(mu, G, b, variance=var, noise=1e8)
    torch.testing.assert_close(big.mean, mu, rtol=0, atol=1e-12)
    inf = cl.functional.condition_gaussian(mu, G, b, variance=var, noise=math.inf)
    assert torch.equal(inf.mean, mu) and torch.equal(inf.variance, var)
    part = cl.functional.condition_gaussian(
        mu, G, b, variance=var, noise=torch.tensor([0.0, math.inf, 0.0])
    )
    only = cl.functional.condition_gaussian(mu, G[[0, 2]], b[:, [0, 2]], variance=var)
    torch.testing.assert_close(part.mean, only.mean, rtol=TOL, atol=TOL)


def test_diagonal_low_rank_full_agree():
    mu, var, G, b = problem(n=30, m=2, batch=(2, 3))
    L = torch.randn(2, 3, 30, 4, dtype=F64)
    lr = cl.functional.condition_gaussian(mu, G, b, variance=var, low_rank=L)
    full = cl.functional.condition_gaussian(mu, G, b, covariance=torch.diag_embed(var) + L @ L.mT)
    torch.testing.assert_close(lr.mean, full.mean, rtol=TOL, atol=TOL)
    torch.testing.assert_close(lr.variance, full.variance, rtol=TOL, atol=TOL)
    torch.testing.assert_close(lr.covariance(), full.covariance(), rtol=TOL, atol=TOL)
    diag = cl.functional.condition_gaussian(mu, G, b, variance=var)
    dense = cl.functional.condition_gaussian(mu, G, b, covariance=torch.diag_embed(var))
    torch.testing.assert_close(diag.mean, dense.mean, rtol=TOL, atol=TOL)
    torch.testing.assert_close(diag.covariance(), dense.covariance(), rtol=TOL, atol=TOL)
    only_lr = cl.functional.condition_gaussian(mu, G, b, low_rank=L)  # K = 4 >= M = 2
    ref, _ = dense_update(
        mu.reshape(6, 30), G, b.reshape(6, 2), covariance=(L @ L.mT).reshape(6, 30, 30)
    )
    torch.testing.assert_close(only_lr.mean, ref.reshape(2, 3, 30), rtol=1e-9, atol=1e-9)


def test_euclidean_is_orthogonal_projection():
    mu, var, G, b = problem()
    post = cl.functional.condition_gaussian(mu, G, b, variance=var, metric="euclidean")
    Q = torch.linalg.pinv(G)  # G^+ : projection onto {G u = b} is u - G^+ (G u - b)
    ref = mu - (mu @ G.mT - b) @ Q.mT
    torch.testing.assert_close(post.mean, ref, rtol=TOL, atol=TOL)
    assert torch.equal(post.variance, var)  # HardC: the uncertainty as given
    det = cl.functional.condition_gaussian(mu, G, b)  # no uncertainty: Euclidean
    torch.testing.assert_close(det.mean, ref, rtol=TOL, atol=TOL)
    assert det.variance is None and det.factor is None


def test_batching_and_broadcasting():
    mu, var, G, b = problem(batch=(2, 3))
    post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    for i in range(2):
        for j in range(3):
            one = cl.functional.condition_gaussian(mu[i, j], G, b[i, j], variance=var[i, j])
            torch.testing.assert_close(post.mean[i, j], one.mean, rtol=TOL, atol=TOL)
    shared_var = cl.functional.condition_gaussian(mu, G, b, variance=var[0, 0])  # (N,) broadcasts
    ref = dense_update(mu.reshape(6, -1), G, b.reshape(6, -1), variance=var[0, 0].expand(6, -1))
    torch.testing.assert_close(shared_var.mean.reshape(6, -1), ref[0], rtol=TOL, atol=TOL)
    # G (N,), b (*batch,)
    one_row = cl.functional.condition_gaussian(mu, G[0], b[..., 0], variance=var)
    torch.testing.assert_close(one_row.mean @ G[0], b[..., 0], rtol=0, atol=1e-12)
    scalar_b = cl.functional.condition_gaussian(mu, G, 1.5, variance=var)
    torch.testing.assert_close(scalar_b.mean @ G.mT, torch.full_like(b, 1.5), rtol=0, atol=1e-12)


def test_streaming_equals_autograd_path(monkeypatch):
    monkeypatch.setattr(ops, "CHUNK", 64)  # many chunks
    mu, var, G, b = problem(n=1000, m=3, batch=(2,))
    fast = cl.functional.condition_gaussian(mu, G, b, variance=var)
    slow = cl.functional.condition_gaussian(mu.requires_grad_(), G, b, variance=var)
    torch.testing.assert_close(fast.mean, slow.mean.detach(), rtol=TOL, atol=TOL)
    torch.testing.assert_close(fast.variance, slow.variance.detach(), rtol=TOL, atol=TOL)
    x32 = mu.detach().float()
    f32 = cl.functional.condition_gaussian(x32, G.float(), b.float(), variance=var.float())
    assert f32.mean.dtype == torch.float32 and f32.variance.dtype == torch.float32
    res = f32.mean.double() @ G.float().double().mT - b.float().double()
    assert float(res.abs().max()) < 1e-5


def test_dtype_device_and_inputs_untouched():
    mu, var, G, b = problem()
    copies = [t.clone() for t in (mu, var, G, b)]
    post = cl.functional.condition_gaussian(mu.float(), G, b, variance=var.float())
    assert post.mean.dtype == torch.float32 and post.variance.dtype == torch.float32
    cl.functional.condition_gaussian(mu, G, b, variance=var).sample(3)
    for t, c in zip((mu, var, G, b), copies):
        assert torch.equal(t, c)


def test_sampler_statistics():
    mu, var, G, b = problem(n=12, m=2, batch=(2,))
    for kw in ({"variance": var}, {"covariance": spd((2,), 12)}, {"variance": var, "noise": 0.5}):
        post = cl.functional.condition_gaussian(mu, G, b, **kw)
        n = 40000
        s = post.sample(n, generator=torch.Generator().manual_seed(0))
        assert s.shape == (n, 2, 12)
        cov = post.covariance()
        sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
        # mean within 5 standard errors
        assert bool(((s.mean(0) - post.mean).abs() <= 5 * sd / math.sqrt(n) + 1e-12).all())
        emp = torch.einsum("sbi,sbj->bij", s - post.mean, s - post.mean) / n
        # covariance entries: standard error <= sqrt((S_ii S_jj + S_ij^2) / n)
        se = ((sd.unsqueeze(-1) * sd.unsqueeze(-2)) ** 2 + cov**2).sqrt() / math.sqrt(n)
        assert bool(((emp - cov).abs() <= 5 * se + 1e-12).all())
        if "noise" not in kw:  # exact constraint on every sample
            assert float((s @ G.mT - b).abs().max()) < 1e-10


def test_condition_maps_prior_samples_to_posterior():
    mu, var, G, b = problem(n=10, m=2, batch=(1,))
    post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    x = mu + var.sqrt() * torch.randn(
        50000, 1, 10, dtype=F64, generator=torch.Generator().manual_seed(1)
    )
    y = post.condition(x)
    assert float((y @ G.mT - b).abs().max()) < 1e-10
    torch.testing.assert_close(y.var(0), post.variance, rtol=0.05, atol=1e-3)


def test_gradcheck_through_conserve():
    mu, var, G, b = problem(n=7, m=2, batch=(2,))
    S = spd((2,), 7)

    def diag(m, v, gg, bb):
        p = cl.functional.condition_gaussian(m, gg, bb, variance=v)
        return p.mean, p.variance

    def full(m, s, bb):
        p = cl.functional.condition_gaussian(m, G, bb, covariance=0.5 * (s + s.mT))
        return p.mean, p.variance

    def noisy(m, v, s):
        return cl.functional.condition_gaussian(m, G, b, variance=v, noise=s).mean

    args = [t.clone().requires_grad_() for t in (mu, var, G, b)]
    assert torch.autograd.gradcheck(diag, args)
    assert torch.autograd.gradcheck(full, [t.clone().requires_grad_() for t in (mu, S, b)])
    s = torch.tensor([0.3, 0.7], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(
        noisy, [mu.clone().requires_grad_(), var.clone().requires_grad_(), s]
    )


def test_mixture_moment_matching():
    g = torch.Generator().manual_seed(3)
    means = torch.randn(6, 2, 20, dtype=F64, generator=g)
    variances = torch.rand(6, 2, 20, dtype=F64, generator=g) + 0.1
    G = torch.randn(2, 20, dtype=F64, generator=g)
    b = torch.randn(2, 2, dtype=F64, generator=g)
    mix = cl.functional.conserve_mixture(means, G, b, variances=variances, covariance=True)
    posts = [dense_update(means[s], G, b, variance=variances[s]) for s in range(6)]
    m = torch.stack([p[0] for p in posts])
    covs = torch.stack([p[1] for p in posts])
    torch.testing.assert_close(mix.mean, m.mean(0), rtol=TOL, atol=TOL)
    var = covs.diagonal(dim1=-2, dim2=-1).mean(0) + m.var(0, unbiased=False)
    torch.testing.assert_close(mix.variance, var, rtol=TOL, atol=TOL)
    d = m - m.mean(0)
    cov = covs.mean(0) + torch.einsum("sbi,sbj->bij", d, d) / 6
    torch.testing.assert_close(mix.covariance, cov, rtol=TOL, atol=TOL)
    torch.testing.assert_close(mix.mean @ G.mT, b, rtol=0, atol=1e-12)
    assert mix.count == 6
    det = cl.functional.conserve_mixture(list(means), G, b)  # point masses: HardC each
    hardc = torch.stack([dense_update(x, G, b)[0] for x in means])
    torch.testing.assert_close(det.mean, hardc.mean(0), rtol=TOL, atol=TOL)
    torch.testing.assert_close(det.variance, hardc.var(0, unbiased=False), rtol=TOL, atol=TOL)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 30),
    m=st.integers(1, 4),
    batch=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-4, 4),
)
def test_property_exact_and_kkt(n, m, batch, seed, log_scale):
    m = min(m, n)
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(*batch, n, dtype=F64, generator=g) * 10**log_scale
    var = (torch.rand(*batch, n, dtype=F64, generator=g) + 0.01) * 10 ** (2 * log_scale)
    G = torch.randn(m, n, dtype=F64, generator=g)
    b = torch.randn(*batch, m, dtype=F64, generator=g) * 10**log_scale
    post = cl.functional.condition_gaussian(mu, G, b, variance=var)
    scale = (G.abs() @ mu.abs().unsqueeze(-1)).squeeze(-1) + b.abs() + 10**log_scale
    assert bool(((post.mean @ G.mT - b).abs() <= 1e-9 * scale).all())
    ref, _ = dense_update(mu.reshape(-1, n), G, b.reshape(-1, m), variance=var.reshape(-1, n))
    err = (post.mean.reshape(-1, n) - ref).abs().max()
    assert float(err) <= 1e-8 * float(ref.abs().max() + 10**log_scale)
    assert bool((post.variance <= var * (1 + 1e-12)).all())  # conditioning never adds variance
    again = cl.functional.condition_gaussian(post.mean, G, b, variance=var)  # idempotent
    torch.testing.assert_close(again.mean, post.mean, rtol=1e-9, atol=1e-9 * 10**log_scale)


def test_ill_conditioned_system_stays_exact():
    """Covariances that leave (numerically) no freedom along some row combinations: a rank-2
    ensemble covariance with 5 rows, and a smooth kernel's masses at many times."""
    g = torch.Generator().manual_seed(7)
    mu = torch.randn(3, 40, dtype=F64, generator=g)
    G = torch.randn(5, 40, dtype=F64, generator=g)
    b = torch.randn(3, 5, dtype=F64, generator=g)
    L = torch.randn(3, 40, 2, dtype=F64, generator=g)
    post = cl.functional.condition_gaussian(mu, G, b, low_rank=L)
    assert float((post.mean @ G.mT - b).abs().max()) < 1e-12
    s = post.sample(8, generator=g)
    assert float((s @ G.mT - b).abs().max()) < 1e-10
    t = torch.linspace(0, 1, 12, dtype=F64)
    x = torch.linspace(0, 1, 15, dtype=F64)
    pts = torch.cartesian_prod(t, x)
    K = torch.exp(-0.5 * torch.cdist(pts, pts).square() / 0.8**2)  # smooth in t: masses ~ low rank
    rows = cl.Conservation.integral(0.0, dim=1).dense((1, 1, 12, 15))[0]
    post = cl.functional.condition_gaussian(
        torch.sin(6 * pts[:, 1]) + pts[:, 0], rows, 0.0, covariance=K
    )
    assert float((post.mean @ rows.mT).abs().max()) < 1e-12
    assert bool(torch.isfinite(post.variance).all())


def test_per_sample_rows_with_shared_dense_covariance():
    mu, _, G, b = problem(n=12, m=2, batch=(3,), per_sample=True)
    S = spd((), 12)
    post = cl.functional.condition_gaussian(mu, G, b, covariance=S)
    ref, _ = dense_update(mu, G, b, covariance=S.expand(3, 12, 12))
    torch.testing.assert_close(post.mean, ref, rtol=TOL, atol=TOL)


def test_row_outside_the_covariance_range_is_enforced_by_the_polish():
    """A row that sees zero variance only through cancellation (g in the null space of Sigma,
    G Sigma G^T ~ +-1e-17): dropped from the conditioning, enforced with the marginal variances."""
    g = torch.Generator().manual_seed(11)
    L = torch.randn(20, 3, dtype=F64, generator=g)
    G = torch.randn(3, 20, dtype=F64, generator=g)
    Q, _ = torch.linalg.qr(L)
    G[0] = G[0] - Q @ (Q.mT @ G[0])  # g_0 orthogonal to range(L): g_0 Sigma g_0 = 0 (rounding)
    mu = torch.randn(2, 20, dtype=F64, generator=g)
    b = torch.randn(2, 3, dtype=F64, generator=g)
    post = cl.functional.condition_gaussian(mu, G, b, low_rank=L)
    assert float((post.mean @ G.mT - b).abs().max()) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_sparse_rows_are_recomputed_for_new_values(dtype):
    """Sparse rows (integrals per time frame, N >= 4096) take a cached CSR path: matrices of the
    same shape and pattern but other values, a matrix changed in place, and a dense matrix give
    the dense reference every time (the cache is found by exact equality, never by identity)."""
    from constraint_layers.conservation import linalg

    g = torch.Generator().manual_seed(3)
    t, x = 8, 64  # G: 8 x 512, 1/8 of it non-zero
    n = t * x
    pts = torch.cartesian_prod(
        torch.linspace(0, 1, t, dtype=F64), torch.linspace(0, 1, x, dtype=F64)
    )
    S = torch.exp(-0.5 * torch.cdist(pts, pts).square() / 0.3**2) + 1e-3 * torch.eye(n, dtype=F64)
    mu = torch.randn(n, dtype=F64, generator=g)
    b = torch.randn(t, dtype=F64, generator=g)
    G = torch.zeros(t, n, dtype=F64)
    for i in range(t):
        G[i, i * x : (i + 1) * x] = torch.rand(x, dtype=F64, generator=g) + 0.5
    assert linalg.sparse_rows(G) is not None
    dense_rows = torch.randn(t, n, dtype=F64, generator=g)
    assert linalg.sparse_rows(dense_rows) is None  # dense: no sparse form
    for rows in (G, G * 2.0, G.clone().mul_(-1.0), dense_rows, G):
        post = cl.functional.condition_gaussian(mu.to(dtype), rows, b, covariance=S.to(dtype))
        ref, ref_cov = dense_update(
            mu.to(dtype).to(F64)[None], rows, b[None], covariance=S.to(dtype).to(F64)[None]
        )
        ref, ref_cov = ref[0], ref_cov[0]
        tol = 1e-8 if dtype == F64 else 1e-3
        torch.testing.assert_close(post.mean.to(F64), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(
            post.variance.to(F64), ref_cov.diagonal(), rtol=tol, atol=tol * float(S.max())
        )
        assert float((post.mean.to(F64) @ rows.mT - b).abs().max()) < (
            1e-10 if dtype == F64 else 1e-3
        )
    H = G.clone()
    first = cl.functional.condition_gaussian(mu, H, b, covariance=S).mean
    H[0, :x] *= 3.0  # the same tensor, changed in place
    post = cl.functional.condition_gaussian(mu, H, b, covariance=S)
    assert float((post.mean @ H.mT - b).abs().max()) < 1e-10
    assert not torch.allclose(post.mean, first)
