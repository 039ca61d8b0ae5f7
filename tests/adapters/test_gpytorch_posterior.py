"""gpytorch posteriors of wrapped GPs, used the way a gpytorch user uses them (issue 11, 6-14).

Each test builds a tiny GP with fixed hyperparameters (no training) on a (t, x) grid and checks
one promise through gpytorch's own calls: ``sample`` / ``rsample`` / ``log_prob`` / ``entropy``
on what the wrapper returns, under ``gpytorch.settings`` where it matters.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import constraint_layers as cl

gpytorch = pytest.importorskip("gpytorch")

F64, F32 = torch.float64, torch.float32
TWO_PI = 2 * math.pi
TOL = {F64: 1e-12, F32: 1e-5}  # |G s - b| relative to |G| |s|


class GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood=None):
        super().__init__(x, y, likelihood or gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ZeroMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def grid(n_t, n_x, dtype=F64):
    t = torch.linspace(0, 1, n_t, dtype=dtype)
    x = torch.linspace(0, TWO_PI, n_x, dtype=dtype)
    return torch.cartesian_prod(t, x)  # (t, x) flattened in C order


def make_gp(dtype=F64, lengthscale=(0.5, 1.5), n_obs=12, noise=1e-3, seed=0):
    """Sparse noisy observations of exp(-2 t) sin x; hyperparameters fixed by hand."""
    g = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.rand(n_obs, generator=g), torch.rand(n_obs, generator=g) * TWO_PI], -1)
    y = torch.exp(-2 * x[:, 0]) * torch.sin(x[:, 1]) + 0.01 * torch.randn(n_obs, generator=g)
    gp = GP(x.to(dtype), y.to(dtype)).to(dtype)
    gp.covar_module.base_kernel.lengthscale = torch.tensor(lengthscale, dtype=dtype)
    gp.covar_module.outputscale = 1.0
    gp.likelihood.noise = noise
    return gp.eval()


MASS = cl.Conservation.integral(0.0, dim=1, extent=TWO_PI)  # zero mass at every time


def residual(samples, shape, constraint=MASS):
    """max |G s - b| / (|G| |s| + |b|) over samples of the flat event."""
    G, b = constraint.dense((1, *shape))
    s = samples.double().reshape(-1, G.shape[-1])
    gap = (s @ G.mT - b).abs()
    scale = s.abs() @ G.abs().mT + b.abs()
    return float((gap / scale).max())


# ----------------------------------------------------------------------- 6. exact samples
@pytest.mark.parametrize("dtype", [F64, F32])
def test_gpytorch_sampling_paths_conserve(dtype):
    gp = make_gp(dtype)
    model = cl.wrap(gp, MASS, grid_shape=(5, 8))
    x = grid(5, 8, dtype)
    with torch.no_grad():
        post = model(x)
        assert isinstance(post, gpytorch.distributions.MultivariateNormal)
        draws = {
            "sample": post.sample(torch.Size([16])),
            "rsample": post.rsample(torch.Size([16])),
            "base_samples": post.rsample(base_samples=torch.randn(16, 40, dtype=dtype)),
        }
        with gpytorch.settings.fast_pred_samples():
            draws["fast_pred_samples"] = model(x).rsample(torch.Size([16]))
        plain = gp(x).rsample(torch.Size([16]))
    for name, s in draws.items():
        assert s.shape == (16, 40) and s.dtype == dtype, name
        assert residual(s, (1, 5, 8)) < TOL[dtype], name
    assert residual(plain, (1, 5, 8)) > 1e-3  # the GP's own samples do not conserve
    # the exact root reproduces the conditioned covariance (up to the model root's jitter)
    R = post.lazy_covariance_matrix.root_decomposition().root.to_dense().double()
    S = post.covariance_matrix.double()
    assert float((R @ R.mT - S).abs().max()) < (1e-6 if dtype == F64 else 1e-3)


def test_gradients_flow_through_rsample():
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS, grid_shape=(5, 8))
    s = model(grid(5, 8)).rsample(torch.Size([4]))
    s.square().sum().backward()
    assert gp.covar_module.raw_outputscale.grad is not None
    assert residual(s.detach(), (1, 5, 8)) < TOL[F64]


# ---------------------------------------------------------------------- 7. log_prob, entropy
def subspace_density(mean, cov, G, x):
    """Reference: the density of N(mean, cov) on {G u = G mean} w.r.t. its surface measure, from an
    orthonormal basis Q of null(G): z = Q^T (x - mean) ~ N(0, Q^T cov Q)."""
    m = G.shape[0]
    _, _, Vh = torch.linalg.svd(G)
    Q = Vh[m:].mT  # (N, N - M)
    C = Q.mT @ cov @ Q
    z = (x - mean) @ Q
    L = torch.linalg.cholesky(C)
    logdet = 2 * L.diagonal().log().sum()
    quad = torch.cholesky_solve(z.unsqueeze(-1), L).squeeze(-1).mul(z).sum(-1)
    k = Q.shape[-1]
    logp = -0.5 * (k * math.log(2 * math.pi) + logdet + quad)
    entropy = 0.5 * (k * (1 + math.log(2 * math.pi)) + logdet)
    return logp, entropy


def test_log_prob_is_the_density_on_the_constraint_set():
    gp64, gp32 = make_gp(F64, lengthscale=(0.3, 0.8)), make_gp(F32, lengthscale=(0.3, 0.8))
    shape = (4, 5)
    G, _ = MASS.dense((1, 1, *shape))  # (M, N)
    wrapped64 = cl.wrap(gp64, MASS, grid_shape=shape)
    wrapped32 = cl.wrap(gp32, MASS, grid_shape=shape)
    with torch.no_grad():
        post = wrapped64(grid(*shape))
        x = post.sample(torch.Size([3]))
        ref_lp, ref_h = subspace_density(post.mean, post.covariance_matrix, G, x)
        values = []
        for jitter in (1e-10, 1e-8, 1e-6):  # gpytorch's jitter plays no part
            with gpytorch.settings.cholesky_jitter(jitter, jitter):
                values.append(post.log_prob(x))
        post32 = wrapped32(grid(*shape, F32))
        lp32 = post32.log_prob(x.float())
        off = post.log_prob(gp64(grid(*shape)).mean)  # the unconstrained mean: off the set
    for v in values:
        torch.testing.assert_close(v, ref_lp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(post.entropy(), ref_h, rtol=1e-6, atol=1e-6)
    assert torch.equal(values[0], values[1]) and torch.equal(values[0], values[2])
    assert lp32.dtype == F32 and bool(torch.isfinite(lp32).all())
    torch.testing.assert_close(lp32.double(), ref_lp, rtol=1e-3, atol=1e-2)
    assert float(off) == -math.inf


def test_log_prob_with_constraint_noise_is_the_ordinary_density():
    gp = make_gp(F64, lengthscale=(0.3, 0.8))
    model = cl.wrap(gp, MASS, grid_shape=(4, 5), noise=0.05)
    with torch.no_grad():
        post = model(grid(4, 5))
        x = gp(grid(4, 5)).mean  # off the constraint set: finite, the constraint is soft
        dense = torch.distributions.MultivariateNormal(post.mean, post.covariance_matrix)
        torch.testing.assert_close(post.log_prob(x), dense.log_prob(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 8. skip_posterior_variances
def test_skip_posterior_variances_projects_the_mean_euclidean():
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS, grid_shape=(5, 8))
    x = grid(5, 8)
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        post, plain = model(x), gp(x)
    assert residual(post.mean, (1, 5, 8)) < TOL[F64]
    # no covariance to weigh by: the Euclidean (HardC) projection of the GP's mean
    G, b = MASS.dense((1, 1, 5, 8))
    r = G @ plain.mean - b[0]
    expected = plain.mean - G.mT @ torch.linalg.solve(G @ G.mT, r)
    torch.testing.assert_close(post.mean, expected)
    # gpytorch's zero covariance comes back untouched
    assert type(post.lazy_covariance_matrix) is type(plain.lazy_covariance_matrix)


# ------------------------------------------------------ 9. torch.distributions heads
class DistributionHead(torch.nn.Module):
    """A (batch, 3) -> MultivariateNormal / LowRankMultivariateNormal over 12 outputs."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.lin = torch.nn.Linear(3, 12)
        self.factor = torch.nn.Parameter(torch.sin(torch.arange(48.0)).reshape(12, 4))

    def forward(self, x):
        m, W = self.lin(x), self.factor.to(x.dtype)
        if self.kind == "full":
            cov = W @ W.mT + 0.1 * torch.eye(12, dtype=x.dtype)
            return torch.distributions.MultivariateNormal(m, covariance_matrix=cov)
        return torch.distributions.LowRankMultivariateNormal(m, W, torch.full((12,), 0.1))


TWO_ROWS = cl.Conservation(  # the sums of the first and of the last six outputs
    torch.tensor([[1.0] * 6 + [0.0] * 6, [0.0] * 6 + [1.0] * 6], dtype=F64),
    torch.tensor([1.0, -2.0], dtype=F64),
)


@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_torch_distribution_heads(kind, dtype):
    head = DistributionHead(kind).to(dtype)
    model = cl.wrap(head, TWO_ROWS)
    x = torch.randn(5, 3, dtype=dtype)
    out = model(x)
    assert isinstance(out, torch.distributions.MultivariateNormal)  # LowRank: see generic.py
    assert not isinstance(out, torch.distributions.LowRankMultivariateNormal)
    G, b = TWO_ROWS.G, TWO_ROWS.b
    s = out.rsample(torch.Size([7]))
    assert s.shape == (7, 5, 12) and s.dtype == dtype
    gap = (s.double() @ G.mT - b).abs().max()
    assert float(gap) < (1e-12 if dtype == F64 else 1e-5)
    # the same posterior as the functional conditioning
    with torch.no_grad():
        raw = head(x)
        cov = raw.covariance_matrix
        ref = cl.functional.condition_gaussian(raw.mean, G, b, covariance=cov.double())
    torch.testing.assert_close(out.mean, ref.mean.to(dtype), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        out.covariance_matrix.double(), ref.covariance().double(), rtol=1e-4, atol=1e-5
    )
    if kind == "lowrank":  # the Euclidean metric leaves the covariance: same type back
        hardc = cl.wrap(head, TWO_ROWS, metric="euclidean")(x)
        assert type(hardc) is torch.distributions.LowRankMultivariateNormal


# ------------------------------------------------------------------------ 10. ensembles
@pytest.mark.parametrize("dtype", [F64, F32])
def test_ensemble_of_gps(dtype):
    gps = [make_gp(dtype, seed=i) for i in range(3)]
    model = cl.wrap(cl.adapters.Ensemble(gps), MASS, grid_shape=(5, 8))
    x = grid(5, 8, dtype)
    with torch.no_grad():
        post = model(x)
        s = post.sample(torch.Size([8]))
        members = [cl.wrap(gp, MASS, grid_shape=(5, 8))(x) for gp in gps]
    assert isinstance(post, gpytorch.distributions.MultivariateNormal)
    assert residual(post.mean, (1, 5, 8)) < TOL[dtype]
    assert residual(s, (1, 5, 8)) < TOL[dtype]
    assert bool(torch.isfinite(post.log_prob(s)).all())
    # moment matching with covariance: mean of the members, covariance = mean covariance +
    # covariance of the means
    means = torch.stack([m.mean.double() for m in members])
    covs = torch.stack([m.covariance_matrix.double() for m in members])
    d = means - means.mean(0)
    expected = covs.mean(0) + (d.unsqueeze(-1) * d.unsqueeze(-2)).mean(0)
    tol = 1e-10 if dtype == F64 else 1e-4
    torch.testing.assert_close(post.mean.double(), means.mean(0), rtol=tol, atol=tol)
    torch.testing.assert_close(post.covariance_matrix.double(), expected, rtol=tol, atol=tol)


# ------------------------------------------------------------------------ 11. multitask
class MultitaskGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, tasks=2):
        super().__init__(x, y, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=tasks))
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ZeroMean(), num_tasks=tasks)
        self.covar_module = gpytorch.kernels.MultitaskKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=2), num_tasks=tasks, rank=1
        )

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(
            self.mean_module(x), self.covar_module(x)
        )


def make_multitask_gp(dtype=F64):
    g = torch.Generator().manual_seed(0)
    x = torch.stack([torch.rand(10, generator=g), torch.rand(10, generator=g) * TWO_PI], -1)
    y = torch.stack([torch.sin(x[:, 1]), torch.cos(x[:, 1]) + x[:, 0]], -1)
    gp = MultitaskGP(x.to(dtype), y.to(dtype)).to(dtype)
    gp.covar_module.data_covar_module.lengthscale = torch.tensor([0.5, 1.5], dtype=dtype)
    gp.likelihood.noise = 1e-3
    return gp.eval()


@pytest.mark.parametrize("dtype", [F64, F32])
def test_multitask_gp_per_task_and_across_tasks(dtype):
    gp = make_multitask_gp(dtype)
    x = grid(4, 6, dtype)
    task1 = cl.Conservation.integral(1.0, dim=1, extent=TWO_PI, channels=1)  # task 1 only
    # across tasks: the two tasks' masses add up to 0 at each time (flat layout (tasks, t, x))
    w = cl.quadrature.trapezoid(6, extent=TWO_PI, dtype=F64)
    across = torch.zeros(4, 2, 4, 6, dtype=F64)
    for t in range(4):
        across[t, :, t, :] = w
    total = cl.Conservation(across.reshape(4, -1), 0.0)
    for cons, shape in ((task1, (1, 2, 4, 6)), (total, (1, 2, 4, 6))):
        model = cl.wrap(gp, cons, grid_shape=(4, 6))
        with torch.no_grad():
            post, plain = model(x), gp(x)
            s = post.rsample(torch.Size([5]))  # (5, points, tasks)
        assert isinstance(post, gpytorch.distributions.MultitaskMultivariateNormal)
        assert post.mean.shape == plain.mean.shape == (24, 2) and s.shape == (5, 24, 2)
        assert post.variance.shape == (24, 2)
        to_grid = lambda u: u.mT.reshape(-1, 2, 4, 6)  # noqa: E731  (points, tasks) -> grid
        assert residual(to_grid(post.mean), shape[1:], cons) < TOL[dtype]
        assert residual(to_grid(s), shape[1:], cons) < TOL[dtype]
        assert residual(to_grid(plain.mean), shape[1:], cons) > 1e-4
        # the dense reference in the task-major layout (tasks correlate: task 0 moves too)
        perm = torch.arange(48).reshape(24, 2).mT.reshape(-1)
        cov = plain.covariance_matrix.double()[perm][:, perm]
        cov = 0.5 * (cov + cov.mT)
        G, b = cons.dense(shape)
        ref = cl.functional.condition_gaussian(
            plain.mean.mT.reshape(-1).double(), G, b[0], covariance=cov
        )
        tol = 1e-9 if dtype == F64 else 1e-4
        torch.testing.assert_close(post.mean.mT.reshape(-1).double(), ref.mean, rtol=tol, atol=tol)


# ------------------------------------------------------------------- 12. SVGP in train mode
class SVGP(gpytorch.models.ApproximateGP):
    def __init__(self, z):
        dist = gpytorch.variational.CholeskyVariationalDistribution(z.shape[0])
        strategy = gpytorch.variational.VariationalStrategy(self, z, dist)
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.RBFKernel()

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def test_svgp_in_train_mode_says_to_call_eval():
    gp = SVGP(torch.linspace(0, 1, 5, dtype=F64).unsqueeze(-1)).to(F64)
    model = cl.wrap(gp, cl.Conservation.integral(0.25))
    x = torch.linspace(0, 1, 30, dtype=F64).unsqueeze(-1)
    model.train()
    with pytest.raises(ValueError, match=r"train mode.*\.eval\(\)"):
        model(x)
    model.eval()
    with torch.no_grad():
        f = model(x)
    assert abs(float(cl.quadrature.trapezoid(30) @ f.mean) - 0.25) < 1e-12


# --------------------------------------------------------------------- 13. error quality
def test_missing_grid_shape_names_it():
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS)  # no grid_shape: the 40 points read as a 1D grid
    with pytest.raises(cl.errors.GridError, match=r"grid_shape=\(d1, \.\.\., dn\)"):
        model(grid(5, 8))


def test_nearly_dependent_conflicting_rows_warn():
    gp = make_gp(F64)
    G, _ = MASS.dense((1, 1, 5, 8))
    noise = 1e-6 * torch.randn(40, dtype=F64, generator=torch.Generator().manual_seed(0))
    nearly = G[0] + noise  # the mass at t = 0, up to 1e-6
    x = grid(5, 8)
    conflicting = cl.wrap(gp, MASS, cl.Conservation(nearly, 1.0), grid_shape=(5, 8))
    with pytest.warns(cl.errors.ConditioningWarning, match=r"rows \[0, 5\] are nearly dependent"):
        with torch.no_grad():
            conflicting(x)
    consistent = cl.wrap(gp, MASS, cl.Conservation(nearly, 0.0), grid_shape=(5, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error", cl.errors.ConditioningWarning)
        with torch.no_grad():
            post = consistent(x)  # totals agree: no warning, a modest update
    assert float(post.mean.abs().max()) < 2 * float(gp(x).mean.abs().max())


# --------------------------------------------------- 14. hyperparameters, constraint in place
def test_fit_hyperparameters_with_the_constraint_in_place():
    """gpytorch's ExactMarginalLogLikelihood takes the GP itself (``wrapped.model``: it only reads
    the model's priors and added loss terms) and the wrapper's output: with observations on the
    grid, that is the marginal likelihood of the data under the GP conditioned on G f = b."""
    shape = (4, 5)
    x = grid(*shape)
    truth = torch.exp(-2 * x[:, 0]) * torch.sin(x[:, 1])
    y = truth + 0.05 * torch.randn(20, dtype=F64, generator=torch.Generator().manual_seed(1))
    gp = GP(x, y).to(F64)
    wrapped = cl.wrap(gp, MASS, grid_shape=shape)
    with pytest.raises(RuntimeError, match="pass the underlying GP"):  # gpytorch's own check
        gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, wrapped)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(gp.likelihood, wrapped.model)
    wrapped.train()
    opt = torch.optim.Adam(wrapped.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = wrapped(x)  # the constrained prior at the (grid) training inputs
        loss = -mll(out, y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    # the objective is log N(y; mu~, K~ + s^2 I), K~ the prior conditioned on G f = b
    with torch.no_grad():
        out = wrapped(x)
        K = gp.covar_module(x).to_dense()
        G, b = MASS.dense((1, 1, *shape))
        cond = cl.functional.condition_gaussian(torch.zeros(20, dtype=F64), G, b[0], covariance=K)
        noise = gp.likelihood.noise * torch.eye(20, dtype=F64)
        ref = torch.distributions.MultivariateNormal(cond.mean, cond.covariance() + noise)
        torch.testing.assert_close(mll(out, y), ref.log_prob(y) / 20, rtol=1e-6, atol=1e-8)
    wrapped.eval()
    with torch.no_grad():
        assert residual(wrapped(grid(*shape)).mean, (1, *shape)) < TOL[F64]


# ------------------------------------------------------------- speed path: same values, grads
def test_sparse_product_path_matches_the_dense_reference_with_gradients():
    """The posterior covariance times the sparse G^T goes through CSR products (M >= 4 rows);
    values and gradients into the hyperparameters equal the dense computation."""
    gp = make_gp(F64)
    x = grid(6, 8)
    model = cl.wrap(gp, MASS, grid_shape=(6, 8))

    def loss_and_grads(fn):
        gp.zero_grad()
        mean, var = fn()
        loss = mean.square().sum() + var.sum()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in gp.parameters() if p.grad is not None]

    def wrapped():
        f = model(x)
        return f.mean, f.variance

    def dense():
        f = gp(x)
        G, b = MASS.dense((1, 1, 6, 8))
        post = cl.functional.condition_gaussian(f.mean, G, b[0], covariance=f.covariance_matrix)
        return post.mean, post.variance

    (l1, g1), (l2, g2) = loss_and_grads(wrapped), loss_and_grads(dense)
    torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-12)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
