"""Gaussians with a full covariance (dense, low rank, a linear operator) conditioned on local
rows, with walls of any kind and totals: mean and marginal variances equal to dense float64
conditioning ``Sigma - Sigma A^T (A Sigma A^T)^+ A Sigma``; exact Matheron draws (rows, moments);
gradients through the mean; the layer's records; a gpytorch GP over a velocity field."""

from __future__ import annotations

import math

import pytest
import torch
from _local_refs import dense_div

import constraint_layers as cl
from constraint_layers.functional import boundary_rows, condition_local
from constraint_layers.local.covariance import LocalConditioned
from constraint_layers.rows import Rows

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def dense_conditioning(m, S, A, d=None):
    """Mean and marginal variances of ``N(m, S)`` conditioned on ``A u = d`` (float64 dense
    pseudo-inverse); ``S`` (N, N) or (batch, N, N)."""
    means, variances = [], []
    for b in range(m.shape[0]):
        Sb = (S[b] if S.ndim == 3 else S).to(F64)
        x = m[b].flatten().to(F64)
        r = A @ x - (0 if d is None else d[b])
        Kp = torch.linalg.pinv(A @ Sb @ A.T, hermitian=True, rtol=1e-11)
        means.append(x - Sb @ A.T @ (Kp @ r))
        variances.append((Sb - Sb @ A.T @ Kp @ A @ Sb).diagonal())
    return torch.stack(means).reshape(m.shape), torch.stack(variances).reshape(m.shape)


def random_covariance(N, batch=None, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    shape = (N, rank or N // 2) if batch is None else (batch, N, rank or N // 2)
    X = torch.randn(*shape, dtype=F64, generator=g) / math.sqrt(shape[-1])
    return X @ X.mT + 0.1 * torch.eye(N, dtype=F64)


def no_slip():
    return (cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1))


def wall_matrix(shape, walls):
    rows = boundary_rows(shape, list(walls), include_overridden=False)
    st = Rows.stack([r for r in rows if r.num_rows], shape[0])
    return st.dense(math.prod(shape[1:])), st.rhs


class Operator:
    """A covariance as a bare linear operator: ``@`` and ``diagonal()`` only."""

    def __init__(self, S):
        self.S, self.shape, self.dtype = S, S.shape, S.dtype
        self.products = 0

    def __matmul__(self, x):
        self.products += 1
        return self.S @ x

    def diagonal(self, dim1=-2, dim2=-1):
        return self.S.diagonal(dim1=dim1, dim2=dim2)


# ----------------------------------------------------------------- against dense conditioning
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("periodic", [False, True])
def test_dense_covariance_equals_dense_conditioning_at_16x16(periodic, dtype):
    grid, N = (16, 16), 512
    g = torch.Generator().manual_seed(1)
    m = torch.randn(2, 2, *grid, dtype=F64, generator=g)
    S = random_covariance(N, batch=2, seed=2)
    con = cl.DivergenceFree(periodic=periodic)
    C = dense_div((2, *grid), [1 / 16] * 2 if periodic else [1 / 15] * 2, periodic=periodic)
    post = condition_local(m.to(dtype), None, con, covariance=S.to(dtype))
    assert isinstance(post, LocalConditioned)
    mean, var = dense_conditioning(m, S.to(dtype).to(F64), C)
    assert post.mean.dtype == dtype and post.variance.dtype == dtype
    scale = float(m.abs().max())
    assert float((post.mean.to(F64) - mean).abs().max()) <= TOL[dtype] * scale
    assert float((post.variance.to(F64) - var).abs().max()) <= TOL[dtype] * float(S.max())
    r = post.mean.to(F64).flatten(1) @ C.T
    assert float(r.abs().max()) <= TOL[dtype] * float(C.abs().sum(1).max()) * scale
    assert 0 < post.iterations[0] < 200


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_slip_walls_with_dense_covariance_equal_dense(dtype):
    grid = (12, 11)
    shape, N = (2, 2, *grid), 2 * 132
    g = torch.Generator().manual_seed(3)
    m = torch.randn(shape, dtype=F64, generator=g)
    S = random_covariance(N, seed=4)
    post = condition_local(m.to(dtype), None, cl.DivergenceFree(), *no_slip(), covariance=S)
    C = dense_div(shape[1:], [1 / 11, 1 / 10])
    free = torch.zeros(shape[1:], dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    E = torch.eye(N, dtype=F64)[~free.flatten()]  # u = 0 at the walls
    mean, var = dense_conditioning(m, S, torch.cat([C, E]))
    assert float((post.mean.to(F64) - mean).abs().max()) <= TOL[dtype] * float(m.abs().max())
    assert float((post.variance.to(F64) - var).abs().max()) <= TOL[dtype] * float(S.max())
    # the wall values to the bit, their variance exactly 0; the correlated interior moved
    assert bool((post.mean[:, ~free] == 0).all()) and bool((post.variance[:, ~free] == 0).all())


def test_low_rank_and_linear_operator_equal_dense():
    grid, N = (10, 9), 180
    shape = (2, 2, *grid)
    g = torch.Generator().manual_seed(5)
    m = torch.randn(shape, dtype=F64, generator=g)
    L = 0.4 * torch.randn(N, 12, dtype=F64, generator=g)
    d = 0.2 + torch.rand(shape, dtype=F64, generator=g)
    C = dense_div(shape[1:], [1 / 9, 1 / 8])
    con = cl.DivergenceFree()
    post = condition_local(m, d, con, low_rank=L)
    S = L @ L.T + torch.diag_embed(d.reshape(2, N))
    mean, var = dense_conditioning(m, S, C)
    assert float((post.mean - mean).abs().max()) <= 1e-10 * float(m.abs().max())
    assert float((post.variance - var).abs().max()) <= 1e-10
    # a bare operator (only @ and diagonal()) gives the same, matrix-free
    S1 = random_covariance(N, seed=6)
    op = Operator(S1)
    post = condition_local(m, None, con, covariance=op)
    mean, var = dense_conditioning(m, S1, C)
    assert float((post.mean - mean).abs().max()) <= 1e-10 * float(m.abs().max())
    assert op.products > 0
    assert float((post.variance - var).abs().max()) <= 1e-10


@pytest.mark.parametrize("kind", ["neumann", "periodic", "mixed"])
def test_other_walls_condition_jointly_equal_dense(kind):
    """Neumann or periodic walls (sparse rows) and the local rows conditioned jointly, for a
    diagonal variance and a dense covariance."""
    grid = (10, 12)
    shape, N = (2, 2, *grid), 240
    walls = {
        "neumann": (cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1)),
        "periodic": (cl.Periodic(dim=1),),
        "mixed": (cl.Dirichlet(0.0, dim=0), cl.Periodic(dim=1)),
    }[kind]
    g = torch.Generator().manual_seed(7)
    m = torch.randn(shape, dtype=F64, generator=g)
    v = 0.1 + 2 * torch.rand(shape, dtype=F64, generator=g)
    C = dense_div(shape[1:], [1 / 9, 1 / 11])
    W, w = wall_matrix(shape, walls)
    A = torch.cat([C, W])
    d = torch.cat([torch.zeros(2, 120, dtype=F64), w], 1)
    S = random_covariance(N, seed=8)
    for post, Sig in (
        (condition_local(m, v, cl.DivergenceFree(), *walls), torch.diag_embed(v.reshape(2, N))),
        (condition_local(m, None, cl.DivergenceFree(), *walls, covariance=S), S),
    ):
        mean, var = dense_conditioning(m, Sig, A, d)
        assert float((post.mean - mean).abs().max()) <= 1e-10 * float(m.abs().max())
        assert float((post.variance - var).abs().max()) <= 1e-10 * float(Sig.max())
        s = post.sample(3, generator=torch.Generator().manual_seed(0)).flatten(2)
        assert float((s @ A.T - d).abs().max()) <= 1e-9 * float(s.abs().max())


def test_incompatible_walls_raise():
    """Neumann values no divergence-free field takes (measured: the stacked rows leave a
    least-squares residual of 0.13) raise instead of a compromise."""
    m = torch.randn(1, 2, 10, 12, dtype=F64, generator=torch.Generator().manual_seed(0))
    walls = (cl.Neumann(0.0, dim=0), cl.Neumann(0.5, dim=1))
    with pytest.raises(cl.errors.IncompatibleConstraintsError, match="cannot hold"):
        condition_local(m, torch.ones_like(m), cl.DivergenceFree(), *walls)


def test_totals_with_dense_covariance_equal_dense():
    grid = (9, 8)
    shape, N = (1, 2, *grid), 144
    g = torch.Generator().manual_seed(9)
    m = torch.randn(shape, dtype=F64, generator=g)
    S = random_covariance(N, seed=10)
    totals = (cl.Conservation.integral(0.3, dim=(0, 1), channels=0),)
    post = condition_local(m, None, cl.DivergenceFree(), *no_slip(), *totals, covariance=S)
    free = torch.zeros(shape[1:], dtype=torch.bool)
    free[:, 1:-1, 1:-1] = True
    C = dense_div(shape[1:], [1 / 8, 1 / 7])
    G = totals[0].rows(shape).dense(N)
    E = torch.eye(N, dtype=F64)[~free.flatten()]
    A = torch.cat([C, E, G])
    d = torch.zeros(1, A.shape[0], dtype=F64)
    d[0, -1] = 0.3
    mean, var = dense_conditioning(m, S, A, d)
    # the reference's own rounding: cond(A S A^T) ~ 1e5 here
    assert float((post.mean - mean).abs().max()) <= 1e-9 * float(m.abs().max())
    assert float((post.variance - var).abs().max()) <= 1e-9


# ------------------------------------------------------------------------------------ draws
def test_draws_satisfy_the_rows_and_match_the_moments():
    """Many Matheron draws (seeded): the sample mean and variance within a few standard errors
    of the exact posterior's; every draw satisfies every row."""
    grid, N = (5, 6), 60
    shape = (1, 2, *grid)
    g = torch.Generator().manual_seed(11)
    m = torch.randn(shape, dtype=F64, generator=g)
    S = random_covariance(N, seed=12)
    post = condition_local(m, None, cl.DivergenceFree(), covariance=S)
    n = 4000
    s = post.sample(n, generator=torch.Generator().manual_seed(13))
    C = dense_div(shape[1:], [1 / 4, 1 / 5])
    assert s.shape == (n, *shape)
    assert float((s.flatten(2) @ C.T).abs().max()) <= 1e-10 * float(s.abs().max()) * 10
    var = post.variance
    z_mean = (s.mean(0) - post.mean) / (var / n).sqrt().clamp_min(1e-300)
    z_mean = z_mean[var > 1e-12]
    assert float(z_mean.abs().max()) < 5.0 and float(z_mean.abs().mean()) < 1.2
    # sample variance: standard error sqrt(2 / (n - 1)) var for a Gaussian
    z_var = (s.var(0) - var) / (var * math.sqrt(2 / (n - 1)))
    z_var = z_var[var > 1e-12]
    assert float(z_var.abs().max()) < 5.0 and float(z_var.abs().mean()) < 1.2
    # the full sample covariance against the dense posterior covariance
    cov = post.covariance()[0]
    emp = torch.cov(s.reshape(n, N).T)
    assert float((emp - cov).abs().max()) < 5 * math.sqrt(2 / n) * float(cov.diagonal().max())


def test_hutchinson_estimate_within_its_standard_error():
    grid, N = (8, 8), 128
    g = torch.Generator().manual_seed(14)
    m = torch.randn(1, 2, *grid, dtype=F64, generator=g)
    post = condition_local(m, None, cl.DivergenceFree(), covariance=random_covariance(N, seed=15))
    est, se = post.estimate_variance(256, generator=torch.Generator().manual_seed(3))
    ratio = (est - post.variance).abs() / se
    assert bool((se > 0).all())
    assert float(ratio.max()) < 5.0 and float(ratio.mean()) < 1.2


def test_variance_beyond_the_dense_limit_names_the_estimator():
    m = torch.zeros(1, 2, 65, 64, dtype=F64)
    L = torch.zeros(2 * 65 * 64, 1, dtype=F64)
    post = condition_local(m, torch.ones_like(m), cl.DivergenceFree(periodic=True), low_rank=L)
    with pytest.raises(NotImplementedError, match="estimate_variance"):
        _ = post.variance


# ---------------------------------------------------------------------------------- gradients
def test_gradcheck_through_the_mean_in_mean_covariance_and_low_rank():
    grid, N = (4, 5), 40
    g = torch.Generator().manual_seed(16)
    m = torch.randn(1, 2, *grid, dtype=F64, generator=g).requires_grad_()
    X = (torch.randn(N, 3, dtype=F64, generator=g) / math.sqrt(3)).requires_grad_()
    con = cl.DivergenceFree()

    def f(m, X):
        S = X @ X.T + 0.5 * torch.eye(N, dtype=F64)
        return condition_local(m, None, con, *no_slip(), covariance=S).mean

    assert torch.autograd.gradcheck(f, (m, X), fast_mode=True)
    L = (0.3 * torch.randn(N, 3, dtype=F64, generator=g)).requires_grad_()
    d = (0.5 + torch.rand(1, 2, *grid, dtype=F64, generator=g)).requires_grad_()
    per = cl.DivergenceFree(periodic=True)
    assert torch.autograd.gradcheck(
        lambda m, L, d: condition_local(m, d, per, low_rank=L).mean, (m, L, d), fast_mode=True
    )


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs_raise_clear_errors():
    m = torch.zeros(1, 2, 6, 6, dtype=F64)
    S = torch.eye(72, dtype=F64)
    con = cl.DivergenceFree()
    with pytest.raises(ValueError, match="once"):
        condition_local(m, torch.ones_like(m), con, covariance=S)
    with pytest.raises(ValueError, match=r"\(72, 72\)"):
        condition_local(m, None, con, covariance=torch.eye(70, dtype=F64))
    with pytest.raises(TypeError, match="linear operator"):
        condition_local(m, None, con, covariance=[[1.0]])
    with pytest.raises(NotImplementedError, match="bounds"):
        condition_local(m, None, con, cl.Bounds(lower=-1.0), covariance=S)
    with pytest.raises(ValueError, match="no uncertainty"):
        condition_local(m, None, con)


# ------------------------------------------------------------------------ the layer's records
def test_layer_record_with_covariance_and_grid_shape():
    """The layer's entry (``project_record``) on a record with a full covariance over a flat
    event (channels, n) and ``grid_shape``: mean and variances as dense conditioning, the
    downdate ``F`` with ``covariance - F F^T`` the posterior covariance."""
    from constraint_layers.functional import Gaussian
    from constraint_layers.local.project import project_record

    grid, N = (8, 7), 112
    g = torch.Generator().manual_seed(17)
    m = torch.randn(2, 56, dtype=F64, generator=g)  # unbatched: event (channels, n)
    S = random_covariance(N, seed=18)
    rec = Gaussian(m, None, S, None, None, 2)
    out = project_record(rec, [cl.DivergenceFree()], grid_shape=grid)
    C = dense_div((2, *grid), [1 / 7, 1 / 6])
    mean, var = dense_conditioning(m.reshape(1, -1), S, C)
    assert out.mean.shape == m.shape and out.variance.shape == m.shape
    assert float((out.mean.reshape(1, -1) - mean).abs().max()) <= 1e-10
    assert float((out.variance.reshape(1, -1) - var).abs().max()) <= 1e-10
    post = S - out.downdate @ out.downdate.mT
    assert float((post.diagonal() - var.flatten()).abs().max()) <= 1e-10
    assert float((C @ post).abs().max()) <= 1e-10
    assert out.conditioned is not None and out.conditioned.noise_free
    # the Euclidean metric moves the mean only and keeps the covariance as given
    eu = project_record(rec, [cl.DivergenceFree()], grid_shape=grid, metric="euclidean")
    assert eu.covariance is S and eu.downdate is None
    assert float((C @ eu.mean.reshape(-1)).abs().max()) <= 1e-10
    with pytest.raises(ValueError, match="grid_shape"):
        project_record(rec, [cl.DivergenceFree()], grid_shape=(8, 8))


# ------------------------------------------------------------------------------------ gpytorch
gpytorch = pytest.importorskip("gpytorch")


class VelocityGP(gpytorch.models.ExactGP):
    """A two-task GP: a velocity field (u, v) over points in the unit square."""

    def __init__(self, x, y):
        super().__init__(x, y, gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2))
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ZeroMean(), num_tasks=2)
        self.covar_module = gpytorch.kernels.MultitaskKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=2), num_tasks=2, rank=1
        )

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(
            self.mean_module(x), self.covar_module(x)
        )


def test_gpytorch_velocity_gp_posterior_is_divergence_free():
    """An exact GP over an 8 x 8 velocity field, wrapped with cl.DivergenceFree: gpytorch's own
    distribution comes back, its mean is divergence-free and equals dense conditioning of the
    model's posterior, its own ``sample`` draws are divergence-free, and its ``log_prob`` is
    the density on the rows (-inf off them)."""
    g = torch.Generator().manual_seed(0)
    xt = torch.rand(12, 2, dtype=F64, generator=g)
    yt = torch.stack([torch.sin(3 * xt[:, 1]), torch.cos(3 * xt[:, 0])], -1)
    gp = VelocityGP(xt, yt).double()
    gp.covar_module.data_covar_module.lengthscale = torch.tensor([0.15, 0.15], dtype=F64)
    gp.likelihood.noise = 1e-3
    gp.eval()
    n = 8
    ax = torch.linspace(0, 1, n, dtype=F64)
    X = torch.stack(torch.meshgrid(ax, ax, indexing="ij"), -1).reshape(-1, 2)
    model = cl.wrap(gp, cl.DivergenceFree(), grid_shape=(n, n))
    with torch.no_grad():
        post, plain = model(X), gp(X)
        s = post.sample(torch.Size([4]))
    assert isinstance(post, gpytorch.distributions.MultitaskMultivariateNormal)
    C = dense_div((2, n, n), [1 / (n - 1)] * 2)

    def task_major(u):  # (..., points, tasks) -> (..., tasks * points)
        return u.mT.reshape(*u.shape[:-2], -1)

    scale = float(C.abs().sum(1).max()) * float(plain.mean.abs().max())
    assert float((C @ task_major(plain.mean)).abs().max()) > 1e-2 * scale
    assert float((C @ task_major(post.mean)).abs().max()) <= 1e-10 * scale
    assert float((task_major(s) @ C.T).abs().max()) <= 1e-9 * scale
    perm = torch.arange(2 * n * n).reshape(n * n, 2).mT.reshape(-1)
    S = plain.covariance_matrix.double()[perm][:, perm]
    mean, var = dense_conditioning(task_major(plain.mean).unsqueeze(0), S, C)
    assert float((task_major(post.mean) - mean[0]).abs().max()) <= 1e-8
    assert float((task_major(post.variance) - var[0]).abs().max()) <= 1e-8
    lp = post.log_prob(s)
    assert lp.shape == (4,) and bool(torch.isfinite(lp).all())
    assert float(post.log_prob(plain.mean)) == -math.inf


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_batched_operator_and_low_rank_record(dtype):
    """A batched operator (batch, N, N) and (1, N, N); a low-rank record with a batch axis and a
    wall (``project_record``): as dense conditioning, draws on the rows and the wall."""
    from constraint_layers.functional import Gaussian
    from constraint_layers.local.project import project_record

    g = torch.Generator().manual_seed(19)
    grid, N = (6, 7), 84
    shape = (2, 2, *grid)
    m = torch.randn(shape, dtype=F64, generator=g)
    S = random_covariance(N, batch=2, seed=20)
    C = dense_div(shape[1:], [1 / 5, 1 / 6])
    tol = TOL[dtype]
    for cov, ref in ((S, S), (S[:1], S[:1].expand(2, N, N))):
        post = condition_local(m.to(dtype), None, cl.DivergenceFree(), covariance=Operator(cov))
        mean, var = dense_conditioning(m.to(dtype).to(F64), ref, C)
        assert float((post.mean.to(F64) - mean).abs().max()) <= tol * float(m.abs().max())
        assert float((post.variance.to(F64) - var).abs().max()) <= tol * float(S.max())
    L = (0.3 * torch.randn(2, N, 5, dtype=F64, generator=g)).to(dtype)
    d = (0.5 + torch.rand(shape, dtype=F64, generator=g)).to(dtype)
    rec = Gaussian(m.to(dtype), d, None, L, None, 3)
    out = project_record(rec, [cl.DivergenceFree(), cl.Dirichlet(0.0, dim=0)])
    free = torch.ones(shape[1:], dtype=torch.bool)
    free[:, 0] = free[:, -1] = False
    Sl = L.to(F64) @ L.to(F64).mT + torch.diag_embed(d.to(F64).reshape(2, N))
    E = torch.eye(N, dtype=F64)[~free.flatten()]
    mean, var = dense_conditioning(m.to(dtype).to(F64), Sl, torch.cat([C, E]))
    assert out.mean.dtype == dtype and out.low_rank is None and out.conditioned is not None
    assert float((out.mean.to(F64) - mean).abs().max()) <= tol * float(m.abs().max())
    assert float((out.variance.to(F64) - var).abs().max()) <= tol * float(Sl.max())
    s = out.conditioned.sample(3, generator=torch.Generator().manual_seed(0))
    scale = float(C.abs().sum(1).max()) * float(s.abs().max())
    assert float((s.to(F64).flatten(2) @ C.T).abs().max()) <= tol * scale
    assert bool((s[:, :, ~free] == 0).all())


def test_wall_rows_enter_the_preconditioner():
    """After Neumann wall rows the fast solve sees them along each channel's own axis: CG's
    iterations stay far below the plain preconditioner's (measured 200 and 430 at 16^2 and 32^2;
    with the wall rows 53 and 56), and the mean is exact."""
    walls = (cl.Neumann(0.0, dim=0), cl.Neumann(0.0, dim=1))
    for n in (16, 32):
        g = torch.Generator().manual_seed(0)
        m = torch.randn(1, 2, n, n, dtype=F64, generator=g)
        v = 1 + 9 * torch.rand(1, 2, n, n, dtype=F64, generator=g)
        post = condition_local(m, v, cl.DivergenceFree(), *walls)
        assert post.iterations[0] < 100
        div = cl.DivergenceFree().residual(post.mean)
        assert float(div.abs().max()) <= 1e-10 * 4 * (n - 1) * float(m.abs().max())
