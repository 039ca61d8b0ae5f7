"""The PSD and rank policy of the conditioning (issue 21, numerics).

- Thresholds come from ``constraint_layers._tolerance`` (rounding of the dtype, problem's scale).
- Rounding below 0 (a conditioned variance of -1e-17) is clamped silently.
- A model's covariance (a linear operator) that is indefinite or asymmetric beyond rounding is
  repaired as gpytorch would, with an ``IndefiniteCovarianceWarning``, and the covariance that
  comes back is the one conditioned: ``G Sigma~ G^T = 0`` to rounding. A caller's own tensor
  raises instead.
- The pseudo-inverse root has a finite backward for repeated eigenvalues (identical task blocks).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import constraint_layers as cl
from constraint_layers import _tolerance as tol
from constraint_layers.conservation import linalg
from constraint_layers.errors import IndefiniteCovarianceWarning
from constraint_layers.functional import condition_gaussian

F64 = torch.float64
linear_operator = pytest.importorskip("linear_operator")
from linear_operator.operators import DenseLinearOperator  # noqa: E402


def rbf(x: torch.Tensor, ls: float) -> torch.Tensor:
    return torch.exp(-0.5 * ((x[:, None] - x[None]) / ls) ** 2)


def mass_rows(T: int, X: int, dtype=F64) -> torch.Tensor:
    w = cl.quadrature.trapezoid(X, dtype=dtype).reshape(1, -1)
    return torch.kron(torch.eye(T, dtype=dtype), w)


# ------------------------------------------------------------------------------ the module
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_tolerance_functions_scale_with_rounding_and_size(dtype):
    eps = torch.finfo(dtype).eps
    assert tol.rounding(dtype) == eps
    assert tol.rounding(torch.complex128) == torch.finfo(F64).eps
    assert tol.rounding(torch.int64) == torch.finfo(F64).eps
    assert tol.rank_cutoff(dtype, 2.0, 10) == pytest.approx(tol.RANK_FACTOR * 10 * eps * 2.0)
    assert tol.rank_cutoff(dtype, 1.0, 100) > tol.rank_cutoff(dtype, 1.0, 10)
    scale = torch.tensor([[1.0], [4.0]], dtype=F64)
    cut = tol.rank_cutoff(dtype, scale, 3)
    assert cut.shape == (2, 1) and float(cut[1, 0]) == pytest.approx(4 * float(cut[0, 0]))
    floor = tol.psd_floor(dtype, 1.0, 5, condition=1e6)
    assert floor == pytest.approx(tol.PSD_FACTOR * (5 + 1e6) * eps)
    assert bool(tol.is_rounding(torch.tensor(-0.5 * floor), dtype, 1.0, 5, 1e6))
    assert not bool(tol.is_rounding(torch.tensor(-2 * floor), dtype, 1.0, 5, 1e6))
    assert not bool(tol.is_rounding(torch.tensor(math.nan), dtype, 1.0))
    assert tol.rounding(torch.float32, F64) == torch.finfo(torch.float32).eps  # the coarsest
    assert tol.dependence_tol(eps, 4, 10) > tol.dependence_tol(eps, 1, 10)
    assert tol.consistency_tol(eps, 4) > tol.consistency_tol(eps, 1)
    assert tol.tolerance(dtype) is tol.TOLERANCES[dtype]  # the existing table still works
    # a model's own misses (cancellation in K** - K*x K^-1 Kx*): between rounding and sqrt(eps)
    assert tol.model_rounding(dtype, 2.0) == pytest.approx(2.0 * math.sqrt(eps))
    assert tol.psd_floor(dtype, 1.0, 10) < tol.model_rounding(dtype, 1.0)


# ------------------------------------------------------------------------ rounding: silent
@pytest.mark.parametrize("lazy", [False, True])
def test_rounding_negative_variances_are_clamped_silently(lazy):
    """A rank-deficient GP-like covariance whose conditioning leaves nothing: the variances
    ``d - |F|^2`` come out as +-rounding; the negative ones are 0, with no warning or error."""
    gen = torch.Generator().manual_seed(0)
    seen_negative = False
    for _ in range(8):
        n = 40
        a = torch.rand(n, 3, dtype=F64, generator=gen) * 1e-3  # small variances (the paper's GP)
        S = a @ a.mT  # rank 3
        G = a.mT.clone()  # three rows that see everything: the posterior variance is 0
        b = G @ torch.randn(n, dtype=F64, generator=gen)
        cov = DenseLinearOperator(S) if lazy else S
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            post = condition_gaussian(torch.zeros(n, dtype=F64), G, b, covariance=cov)
        raw = S.diagonal() - post.factor.square().sum(-1)
        seen_negative |= bool((raw < 0).any())
        assert bool((post.variance >= 0).all())
        assert float(post.variance.max()) <= 1e-12 * float(S.diagonal().max())
        torch.testing.assert_close(G @ post.mean, b, rtol=0, atol=1e-15)
    assert seen_negative  # the case is not vacuous: rounding did go below 0


# ------------------------------------------------------- a model's indefinite covariance: warn
def _indefinite(T: int, X: int, dtype=F64):
    """An inaccurate (CG / float32) posterior: a GP covariance minus a rank-one term that makes
    ``g Sigma g^T`` negative for the first mass row."""
    n = T * X
    x = torch.linspace(0, 1, n, dtype=F64)
    S = rbf(x, 0.03) + 1e-6 * torch.eye(n, dtype=F64)
    g = mass_rows(T, X)[0]
    u = g / g.square().sum()
    S = S - 1.2 * float(g @ S @ g) * torch.outer(u, u)
    assert float(S.diagonal().min()) > 0
    return S.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_indefinite_model_covariance_is_clamped_with_a_warning(dtype):
    T, X = 3, 10
    S = _indefinite(T, X, dtype)
    G = mass_rows(T, X, dtype)
    lam = torch.linalg.eigvalsh(G.double() @ S.double() @ G.double().mT)
    assert float(lam[0]) < 0  # non-vacuous: the rows see a negative direction
    b = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    with pytest.warns(IndefiniteCovarianceWarning, match="warnings.filterwarnings"):
        post = condition_gaussian(
            torch.zeros(T * X, dtype=dtype), G, b, covariance=DenseLinearOperator(S)
        )
    C = post.covariance().double()
    scale = float(S.diagonal().abs().max())
    r = 10 * torch.finfo(dtype).eps * T * X
    assert float((G.double() @ C @ G.double().mT).abs().max()) <= r * scale
    assert float((G.double() @ post.mean.double() - b).abs().max()) <= r * float(b.abs().max())
    assert bool((post.variance >= 0).all())
    s = post.sample(5, generator=torch.Generator().manual_seed(1)).double()
    assert float((s @ G.double().mT - b).abs().max()) <= 10 * r
    # the same matrix from the caller (a tensor): an error, nothing changed silently
    with pytest.raises(ValueError, match="positive semidefinite"):
        condition_gaussian(torch.zeros(T * X, dtype=dtype), G, b, covariance=S)
    # and as an error on request
    with warnings.catch_warnings():
        warnings.simplefilter("error", IndefiniteCovarianceWarning)
        with pytest.raises(IndefiniteCovarianceWarning):
            condition_gaussian(
                torch.zeros(T * X, dtype=dtype), G, b, covariance=DenseLinearOperator(S)
            )


def test_asymmetric_model_covariance_is_symmetrised_and_returned_conditioned():
    T, X = 3, 12
    n = T * X
    x = torch.linspace(0, 1, n, dtype=F64)
    S = rbf(x, 0.3) + 1e-3 * torch.eye(n, dtype=F64)
    skew = 1e-3 * torch.randn(n, n, dtype=F64, generator=torch.Generator().manual_seed(0))
    Sa = S + skew - skew.mT  # a CG posterior: not symmetric
    G = mass_rows(T, X)
    b = torch.zeros(T, dtype=F64)
    with pytest.warns(IndefiniteCovarianceWarning, match="not symmetric"):
        post = condition_gaussian(
            torch.ones(n, dtype=F64), G, b, covariance=DenseLinearOperator(Sa)
        )
    C = post.covariance()
    assert float((G @ C @ G.mT).abs().max()) <= 1e-14 * float(S.diagonal().max())
    ref = condition_gaussian(torch.ones(n, dtype=F64), G, b, covariance=S)  # the symmetric part
    torch.testing.assert_close(post.mean, ref.mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(post.variance, ref.variance, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------- gradients with repeated eigenvalues
def _pinv_sqrt_reference(A: torch.Tensor, cut: float) -> torch.Tensor:
    lam, V = torch.linalg.eigh(A)
    h = torch.where(lam > cut, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    return (V * h) @ V.mT


def test_pinv_sqrt_is_the_pseudo_inverse_root_with_finite_gradients_at_repeated_eigenvalues():
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=gen))
    lam = torch.tensor([0.0, 1e-30, 0.5, 0.5, 2.0, 2.0], dtype=F64)  # two dropped, two pairs
    A = ((Q * lam) @ Q.mT).requires_grad_(True)
    cut = torch.tensor([1e-12], dtype=F64)
    R = linalg._PinvSqrt.apply(A, cut)
    torch.testing.assert_close(R @ R.mT, torch.linalg.pinv(A.detach(), hermitian=True, atol=1e-12))
    (g,) = torch.autograd.grad((R * torch.randn(6, 6, dtype=F64, generator=gen)).sum(), A)
    assert bool(torch.isfinite(g).all()) and float(g.abs().max()) < 1e3
    # eigh's own backward is useless there (1/(l_i - l_j) of rounding-level gaps)
    _, V = torch.linalg.eigh(A)
    (ge,) = torch.autograd.grad((V * _pinv_sqrt_reference(A.detach(), 1e-12)).sum(), A)
    assert not bool(torch.isfinite(ge).all()) or float(ge.abs().max()) > 1e8
    # exactly repeated: R = c^{-1/2} I at A = c I, dR/dA = -c^{-3/2} / 2 (symmetrised)
    c = torch.full((4,), 4.0, dtype=F64)
    A2 = torch.diag(c).requires_grad_(True)
    W = torch.randn(4, 4, dtype=F64, generator=gen)
    (g2,) = torch.autograd.grad((linalg._PinvSqrt.apply(A2, cut) * W).sum(), A2)
    torch.testing.assert_close(g2, -0.5 * 4.0**-1.5 * 0.5 * (W + W.mT))
    _, V2 = torch.linalg.eigh(A2)  # where eigh's backward is NaN
    (ge2,) = torch.autograd.grad((V2 * W).sum(), A2)
    assert not bool(torch.isfinite(ge2).all())

    cut3 = torch.tensor([1e-3], dtype=F64)

    def f(M):
        return linalg._PinvSqrt.apply(0.5 * (M + M.mT), cut3)

    # gradcheck around nearly repeated eigenvalues (the perturbation splits them), with one
    # eigenvalue dropped (0, far below the cutoff 1e-3 whatever the perturbation) and without
    for lam3 in ([0.0, 0.5, 0.5, 2.0, 2.0, 3.0], [0.1, 0.5, 0.5, 2.0, 2.0, 3.0]):
        A3 = ((Q * torch.tensor(lam3, dtype=F64)) @ Q.mT).requires_grad_(True)
        assert torch.autograd.gradcheck(f, (A3,), eps=1e-7, atol=1e-5, rtol=1e-4)


def test_conserve_gradcheck_with_identical_blocks_on_the_pseudo_inverse_path(monkeypatch):
    """Two identical task blocks of a rank-3 covariance, 6 mass rows each: ``G Sigma G^T`` has
    eigenvalue 0 six times (dropped) and its others in pairs; gradcheck through the
    pseudo-inverse (the kept part is well conditioned, so finite differences are meaningful)."""
    calls = []
    original = linalg._PinvSqrt.apply
    monkeypatch.setattr(linalg._PinvSqrt, "apply", lambda *a: calls.append(1) or original(*a))
    T, X, r = 6, 5, 3
    gen = torch.Generator().manual_seed(0)
    Z0 = torch.randn(T * X, r, dtype=F64, generator=gen)
    mu0 = torch.randn(2 * T * X, dtype=F64, generator=gen)
    G = torch.block_diag(mass_rows(T, X), mass_rows(T, X))
    b = torch.zeros(2 * T, dtype=F64)

    def f(Z, mu):
        K = Z @ Z.mT
        post = condition_gaussian(mu, G, b, covariance=torch.block_diag(K, K))
        return post.mean, post.variance

    Z = Z0.clone().requires_grad_(True)
    mu = mu0.clone().requires_grad_(True)
    mean, var = f(Z, mu)
    assert calls  # non-vacuous: the pseudo-inverse path ran
    g = torch.autograd.grad(mean.sum() + var.sum(), (Z, mu))
    assert all(bool(torch.isfinite(x).all()) for x in g)
    torch.testing.assert_close(G @ mean, b, rtol=0, atol=1e-13)
    assert torch.autograd.gradcheck(f, (Z, mu), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- gpytorch models
gpytorch = pytest.importorskip("gpytorch")


class _BatchIndependent(gpytorch.models.ExactGP):
    """gpytorch's "Batch-independent multi-output GP" tutorial model (2 tasks)."""

    def __init__(self, x, y, likelihood):
        super().__init__(x, y, likelihood)
        batch = torch.Size([2])
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch
        )

    def forward(self, x):
        mvn = gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn)


@pytest.mark.parametrize(("dtype", "T", "X"), [(torch.float32, 8, 10), (F64, 24, 10)])
def test_batch_independent_two_output_gp_gradients_are_finite(dtype, T, X, monkeypatch):
    """The README's constrained MLL, one backward and a few steps: identical task blocks used to
    give NaN through eigh's backward (float32 8 x 10, float64 24 x 10)."""
    calls = []
    original = linalg._PinvSqrt.apply
    monkeypatch.setattr(linalg._PinvSqrt, "apply", lambda *a: calls.append(1) or original(*a))
    t, x = torch.meshgrid(
        torch.linspace(0, 1, T, dtype=dtype), torch.linspace(0, 1, X, dtype=dtype), indexing="ij"
    )
    train_x = torch.stack([t, x], -1).reshape(-1, 2)
    y = torch.stack(
        [torch.sin(3 * train_x[:, 1]) * torch.exp(-train_x[:, 0]), torch.cos(3 * train_x[:, 1])],
        -1,
    )
    lik = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
    gp = _BatchIndependent(train_x, y, lik).to(dtype)
    wrapped = cl.wrap(gp, cl.Conservation.integral(0.0, dim=1), grid_shape=(T, X))
    wrapped.train()
    lik.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, wrapped.model)
    for _ in range(2):
        loss = -mll(wrapped(train_x), y)
        gp.zero_grad()
        loss.backward()
        grads = [p.grad for p in gp.parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
        with torch.no_grad():
            for p in gp.parameters():
                p -= 0.01 * p.grad
    assert calls  # non-vacuous: the identical blocks went through the pseudo-inverse


def _kiss_gp(dtype, n: int, iters: int):
    """gpytorch's "KISS-GP 1D" tutorial at a small size (choose_grid_size, Adam 0.1)."""
    torch.manual_seed(0)
    train_x = torch.linspace(0, 1, n, dtype=dtype)
    train_y = torch.sin(train_x * 4 * math.pi) + 0.1 * torch.randn(n, dtype=dtype)

    class KISS(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            size = gpytorch.utils.grid.choose_grid_size(x, 1.0)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.GridInterpolationKernel(
                    gpytorch.kernels.RBFKernel(), grid_size=size, num_dims=1
                )
            )

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    lik = gpytorch.likelihoods.GaussianLikelihood()
    gp = KISS(train_x, train_y, lik).to(dtype)
    gp.train()
    lik.train()
    opt = torch.optim.Adam(gp.parameters(), lr=0.1)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    for _ in range(iters):
        opt.zero_grad()
        (-mll(gp(train_x), train_y)).backward()
        opt.step()
    return gp.eval(), lik.eval()


def _check_conditioned(f, T, X, dtype, scale):
    G = mass_rows(T, X)
    r = 1e-5 if dtype == torch.float32 else 1e-10
    assert float((G @ f.mean.double()).abs().max()) <= r * float(f.mean.abs().max() + 1)
    C = f.covariance_matrix.double()
    # float32: gpytorch's lazy parts (K** - W W^T) cancel, and their dense evaluation rounds
    # differently from the products the conditioning used (7.6e-5 of the row variance measured
    # with fast_pred_var); float64: rounding
    rc = 1e-4 if dtype == torch.float32 else r
    assert float((G @ C @ G.mT).abs().max()) <= rc * scale
    s = f.sample(torch.Size([4])).double()
    assert float((s @ G.mT).abs().max()) <= r * float(s.abs().max())
    assert bool((f.variance >= 0).all())


def test_kiss_gp_float64_cg_path_returns_the_covariance_it_conditioned():
    """CG posterior (training set above max_cholesky_size): its covariance is not symmetric;
    ``G Sigma~ G^T`` was up to 2e-4, it is now 0 to rounding."""
    T, X = 5, 11
    with gpytorch.settings.max_cholesky_size(50):
        gp, _ = _kiss_gp(F64, 200, 5)
        test_x = torch.linspace(0, 1, T * X, dtype=F64)
        wrapped = cl.wrap(gp, cl.Conservation.integral(0.0, dim=1), grid_shape=(T, X))
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", gpytorch.utils.warnings.NumericalWarning)
            scale = float(gp(test_x).variance.max())
            with pytest.warns(IndefiniteCovarianceWarning, match="not symmetric"):
                f = wrapped(test_x)
            _check_conditioned(f, T, X, F64, scale)


@pytest.mark.parametrize("fast", [False, True])
def test_kiss_gp_float32_as_in_the_tutorial(fast):
    T, X = 5, 11
    gp, lik = _kiss_gp(torch.float32, 300, 10)
    test_x = torch.linspace(0, 1, T * X)
    wrapped = cl.wrap(gp, cl.Conservation.integral(0.0, dim=1), grid_shape=(T, X))
    ctx = gpytorch.settings.fast_pred_var() if fast else gpytorch.settings.max_cholesky_size(100)
    with torch.no_grad(), ctx, warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.NumericalWarning)
        warnings.simplefilter("ignore", IndefiniteCovarianceWarning)  # allowed, not required
        scale = float(gp(test_x).variance.max())
        f = wrapped(test_x)
        _check_conditioned(f, T, X, torch.float32, scale)
        pred = lik(f)  # the tutorial's predictive works on the result
        assert bool(torch.isfinite(pred.variance).all())


def test_deep_kernel_learning_float32():
    """gpytorch's DKL tutorial at a small size: an MLP feature extractor into a KISS-GP grid."""
    torch.manual_seed(0)
    n, D, T, X = 300, 4, 4, 10
    train_x = torch.rand(n, D)
    train_y = torch.sin(4 * train_x.sum(-1)) + 0.05 * torch.randn(n)

    class DKL(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.GridInterpolationKernel(
                gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)),
                num_dims=2,
                grid_size=30,
            )
            self.features = torch.nn.Sequential(
                torch.nn.Linear(D, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)
            )
            self.scale = gpytorch.utils.grid.ScaleToBounds(-1.0, 1.0)

        def forward(self, x):
            z = self.scale(self.features(x))
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(z), self.covar_module(z)
            )

    lik = gpytorch.likelihoods.GaussianLikelihood()
    gp = DKL(train_x, train_y, lik)
    opt = torch.optim.Adam(gp.parameters(), lr=0.01)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, gp)
    gp.train()
    lik.train()
    for _ in range(10):
        opt.zero_grad()
        (-mll(gp(train_x), train_y)).backward()
        opt.step()
    gp.eval()
    lik.eval()
    test_x = torch.rand(T * X, D)
    wrapped = cl.wrap(gp, cl.Conservation.integral(0.0, dim=1), grid_shape=(T, X))
    with torch.no_grad(), gpytorch.settings.fast_pred_var(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.NumericalWarning)
        warnings.simplefilter("ignore", IndefiniteCovarianceWarning)
        scale = float(gp(test_x).variance.max())
        f = wrapped(test_x)
        _check_conditioned(f, T, X, torch.float32, scale)


def test_degenerate_density_gradients_are_finite_at_its_repeated_zero_eigenvalues():
    """The density on the constraint set: its covariance has eigenvalue 0 M times (and here
    every other eigenvalue twice); ``log_prob`` agrees with the eigendecomposition formula and
    its gradient is finite (gradcheck away from the cutoff)."""
    from constraint_layers.functional import DegenerateGaussian

    gen = torch.Generator().manual_seed(0)
    n, m = 8, 2
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=F64, generator=gen))
    lam = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 2.0, 2.0], dtype=F64)
    S0 = (Q * lam) @ Q.mT
    mean = torch.randn(n, dtype=F64, generator=gen)
    x = mean + (Q[:, m:] @ torch.randn(n - m, 3, dtype=F64, generator=gen)).mT  # on the support

    def logp(B):  # S = B B^T: rank n - m whatever the perturbation (the support is kept)
        return DegenerateGaussian(mean, B @ B.mT).log_prob(x)

    B = (Q[:, m:] * lam[m:].sqrt()).requires_grad_(True)
    out = logp(B)
    z = (x - mean) @ Q[:, m:] / lam[m:].sqrt()
    ref = -0.5 * ((n - m) * math.log(2 * math.pi) + lam[m:].log().sum() + z.square().sum(-1))
    torch.testing.assert_close(out, ref)
    (g,) = torch.autograd.grad(out.sum(), B)
    assert bool(torch.isfinite(g).all())
    S = S0.clone().requires_grad_(True)  # with respect to the covariance itself: finite too
    (gS,) = torch.autograd.grad(DegenerateGaussian(mean, S).log_prob(x).sum(), S)
    assert bool(torch.isfinite(gS).all())
    assert torch.autograd.gradcheck(logp, (B,), eps=1e-7, atol=1e-5, rtol=1e-4)


def _gp_posterior(T: int, X: int) -> torch.Tensor:
    """A float64 GP posterior on a T x X grid from 60 noisy-free-ish context points (the
    conservation paper's setting: ill-conditioned K, cancellation in K** - K*x K^-1 Kx*)."""
    gen = torch.Generator().manual_seed(3)
    ctx = torch.rand(60, 2, dtype=F64, generator=gen)
    t, x = torch.meshgrid(
        torch.linspace(0, 1, T, dtype=F64), torch.linspace(0, 1, X, dtype=F64), indexing="ij"
    )
    p = torch.stack([t, x], -1).reshape(-1, 2)

    def k(a, b):
        return torch.exp(-0.5 * torch.cdist(a, b).square() / 0.3**2)

    K = k(ctx, ctx) + 1e-6 * torch.eye(60, dtype=F64)
    Ks = k(p, ctx)
    return k(p, p) - Ks @ torch.linalg.solve(K, Ks.mT)


@pytest.mark.parametrize("lazy", [False, True])
def test_decisions_do_not_depend_on_rounding_of_the_blas(lazy):
    """Another machine's BLAS changes the covariance at rounding: the conditioning neither raises
    nor warns, and its results agree to far below the model's own accuracy."""
    T, X = 6, 41
    S = _gp_posterior(T, X)
    G = mass_rows(T, X)
    b = torch.linspace(-0.1, 0.1, T, dtype=F64)
    mu = torch.zeros(T * X, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    scale = float(S.abs().max())
    outs = []
    for _ in range(6):
        E = torch.randn(T * X, T * X, dtype=F64, generator=gen)
        Sp = S + 8 * torch.finfo(F64).eps * scale * (E + E.mT)  # rounding, as summed elsewhere
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            post = condition_gaussian(mu, G, b, covariance=DenseLinearOperator(Sp) if lazy else Sp)
        assert bool((post.variance >= 0).all())
        torch.testing.assert_close(G @ post.mean, b, rtol=0, atol=1e-14)
        outs.append((post.mean, post.variance))
    for mean, var in outs[1:]:
        torch.testing.assert_close(mean, outs[0][0], rtol=0, atol=1e-6 * float(b.abs().max()))
        torch.testing.assert_close(var, outs[0][1], rtol=0, atol=1e-6 * scale)


def test_rounding_amplified_by_an_ill_conditioned_solve_is_still_rounding():
    """The conservation paper's failure on a fresh machine: variances of size 1e-5 and a solve
    with cond ~ 1e10 give "negative variances" of -5e-10 of the largest (the old threshold was
    1e-10): rounding, clamped silently, whatever the BLAS."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for _ in range(10):
        n, delta = 50, 1e-3
        z = torch.rand(n, dtype=F64, generator=gen)
        cols = [z] + [z + delta * torch.randn(n, dtype=F64, generator=gen) for _ in range(2)]
        Z = torch.stack(cols, 1) * 3e-3  # rank 3, nearly collinear: G Sigma G^T ill-conditioned
        S = Z @ Z.mT
        G = Z.mT / 3e-3
        b = G @ torch.randn(n, dtype=F64, generator=gen) * 1e-3
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            post = condition_gaussian(torch.zeros(n, dtype=F64), G, b, covariance=S)
        raw = S.diagonal() - post.factor.square().sum(-1)
        worst = min(worst, float(raw.min() / S.diagonal().max()))
        assert bool((post.variance >= 0).all())
        terms = float((G.abs() @ post.mean.abs() + b.abs()).max())  # what G mean - b sums
        torch.testing.assert_close(G @ post.mean, b, rtol=0, atol=1e-13 * terms)
    assert worst < -1e-10  # non-vacuous: beyond what the former check called rounding


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_log_prob_agrees_with_the_objects_own_samples(dtype):
    """One rank cutoff for the sampling root and the density: gpytorch's own ``sample`` draws
    from the root over the eigenvalues ``log_prob`` keeps, so the log density of the object's
    own samples is distributed as ``-entropy - (chi2_k - k) / 2`` (median about -entropy + 1/3;
    the jittered model root gave -1220 where +535 was expected)."""
    torch.manual_seed(0)
    train_x = torch.linspace(0, 1, 60, dtype=dtype)
    train_y = torch.sin(train_x * 2 * math.pi) + 0.2 * torch.randn(60, dtype=dtype)

    class GP(gpytorch.models.ExactGP):
        def __init__(self, x, y, likelihood):
            super().__init__(x, y, likelihood)
            self.mean_module = gpytorch.means.ConstantMean()
            self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    lik = gpytorch.likelihoods.GaussianLikelihood()
    gp = GP(train_x, train_y, lik).to(dtype)
    gp.covar_module.base_kernel.lengthscale = 0.2
    gp.eval()
    test_x = torch.linspace(0, 1, 41, dtype=dtype)
    wrapped = cl.wrap(gp, cl.Conservation.integral(0.0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", gpytorch.utils.warnings.NumericalWarning)
        f = wrapped(test_x)
        s = f.sample(torch.Size([400]))
        lp = f.log_prob(s).double()
        h = float(f.entropy())
    w = cl.quadrature.trapezoid(41, dtype=F64)
    r = 1e-5 if dtype == torch.float32 else 1e-12
    assert float((s.double() @ w).abs().max()) <= r * float(s.abs().max())
    assert bool(torch.isfinite(lp).all())
    assert abs(float(lp.median()) + h - 1 / 3) < 2.0, (float(lp.median()), -h)


def test_psd_root_of_a_singular_covariance_has_finite_gradients():
    """The sampling root of a singular covariance (the prior's draw when Cholesky fails, the
    ensemble mixture's root): ``root @ root = S``, finite backward at repeated eigenvalues."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=gen))
    lam = torch.tensor([0.0, 0.0, 1.0, 1.0, 3.0, 3.0], dtype=F64)
    B = (Q[:, 2:] * lam[2:].sqrt()).requires_grad_(True)
    S = B @ B.mT
    root = linalg.psd_root(S)
    torch.testing.assert_close(root @ root.mT, S.detach(), rtol=0, atol=1e-13)
    (g,) = torch.autograd.grad(root.sum(), B)
    assert bool(torch.isfinite(g).all())
    assert torch.autograd.gradcheck(
        lambda b: linalg.psd_root(b @ b.mT), (B,), eps=1e-7, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_asymmetric_and_indefinite_model_covariance_is_repaired_not_refused(dtype):
    """A CG posterior in float32 can be both (KISS-GP at gpytorch's tutorial size): evaluated,
    symmetrised, clamped, with warnings; still the model's covariance, never an error."""
    T, X = 3, 10
    S = _indefinite(T, X)
    skew = 1e-2 * torch.randn(T * X, T * X, dtype=F64, generator=torch.Generator().manual_seed(1))
    Sa = (S + skew - skew.mT).to(dtype)
    G = mass_rows(T, X, dtype)
    b = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    with pytest.warns(IndefiniteCovarianceWarning) as record:
        post = condition_gaussian(
            torch.zeros(T * X, dtype=dtype), G, b, covariance=DenseLinearOperator(Sa)
        )
    text = " ".join(str(w.message) for w in record)
    assert "not symmetric" in text and "eigenvalue" in text
    C = post.covariance().double()
    r = 10 * torch.finfo(dtype).eps * T * X
    assert float((G.double() @ C @ G.double().mT).abs().max()) <= r * float(S.diagonal().max())
    assert bool((post.variance >= 0).all())
