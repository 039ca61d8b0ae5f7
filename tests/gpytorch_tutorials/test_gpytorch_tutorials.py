"""gpytorch's tutorials, run as their users run them, with ONE added line: ``cl.wrap(...)``.

Small sizes and a few training steps; float32 (every tutorial's dtype) and float64. For each
tutorial (Simple GP, Multitask, Batch-independent multi-output, SVGP, KISS-GP, Deep Kernel
Learning, Hadamard multitask):

- the wrapped model works where the plain one does, and returns gpytorch's distribution type;
- the posterior mean and gpytorch's own samples conserve (float32 <= 1e-5, float64 <= 1e-10,
  relative to ``|G| |u| + |b|``);
- the variances are at most the plain model's (at the dtype's rounding);
- hyperparameters trained through the wrapper get finite gradients.

The setups follow gpytorch's example notebooks (examples/01_Exact_GPs, 03_Multitask_Exact_GPs,
04_Variational_and_Approximate_GPs, 02_Scalable_Exact_GPs, 06_PyTorch_NN_Integration_DKL).
"""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl

gpytorch = pytest.importorskip("gpytorch")

F64, F32 = torch.float64, torch.float32
DTYPES = [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")]
CONSERVE = {F32: 1e-5, F64: 1e-10}
N_TRAIN, N_TEST = 40, 51
ZERO_MEAN = cl.Conservation.integral(0.0)  # the integral over [0, 1] of each task (channel)


def data(dtype, tasks=1, n=N_TRAIN, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.linspace(0, 1, n, dtype=dtype)
    ys = [torch.sin(2 * math.pi * x), torch.cos(2 * math.pi * x)][:tasks]
    ys = [y + 0.2 * torch.randn(n, generator=g).to(dtype) for y in ys]
    return x, (ys[0] if tasks == 1 else torch.stack(ys, -1))


def fit(model, likelihood, x, y, steps=8, mll=None, lr=0.1):
    """The tutorials' training loop (Adam), on the plain model."""
    model.train()
    likelihood.train()
    mll = mll or gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    args = x if isinstance(x, tuple) else (x,)
    for _ in range(steps):
        opt.zero_grad()
        loss = -mll(model(*args), y)
        loss = loss.sum() if loss.ndim else loss
        loss.backward()
        opt.step()
    model.eval()
    likelihood.eval()


def to_channels(u):
    """(..., points) or (..., points, tasks) -> (..., tasks * points), task-major."""
    return (
        u.unsqueeze(-1).mT.reshape(*u.shape[:-1], -1)
        if u.ndim == 1
        else u.mT.reshape(*u.shape[:-2], -1)
    )


def conservation_gap(u, constraint, tasks, n):
    """max |G u - b| / (|G| |u| + |b|) over the rows and the leading axes."""
    G, b = constraint.dense((1, tasks, n))
    v = u.double().reshape(-1, G.shape[-1])
    return float(((v @ G.mT - b).abs() / (v.abs() @ G.abs().mT + b.abs())).max())


def check_prediction(wrapped, model, args, dtype, constraint=ZERO_MEAN, tasks=1):
    """Predict as the tutorials do (LOVE fast variances) and with gpytorch's default settings;
    conservation, variances, gpytorch's own samples."""
    check_one(wrapped, model, args, dtype, constraint, tasks, fast=False)
    return check_one(wrapped, model, args, dtype, constraint, tasks, fast=True)


def check_one(wrapped, model, args, dtype, constraint, tasks, fast):
    with torch.no_grad(), gpytorch.settings.fast_pred_var(fast):
        plain, f = model(*args), wrapped(*args)
        samples = f.sample(torch.Size([16]))
        observed = wrapped.model.likelihood(f) if hasattr(wrapped.model, "likelihood") else None
    assert isinstance(f, type(plain)) and f.mean.shape == plain.mean.shape
    assert f.mean.dtype == dtype
    n = N_TEST
    flat = lambda u: u.mT.reshape(*u.shape[:-2], -1) if tasks > 1 else u  # noqa: E731
    tol = CONSERVE[dtype]
    assert conservation_gap(flat(plain.mean), constraint, tasks, n) > 100 * tol  # non-vacuous
    assert conservation_gap(flat(f.mean), constraint, tasks, n) <= tol
    assert conservation_gap(flat(samples), constraint, tasks, n) <= tol
    var, var0 = f.variance.double(), plain.variance.double()
    assert bool(torch.isfinite(var).all()) and float(var.min()) >= 0
    slack = 10 * torch.finfo(dtype).eps * n * float(var0.max())
    assert float((var - var0).max()) <= slack
    if observed is not None:
        assert bool(torch.isfinite(observed.variance).all())
    return f


def check_gradients(model, loss):
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


def train_through(wrapped, likelihood, x, y):
    """The README's recipe: gpytorch's MLL of the GP itself, the wrapper's output in train mode."""
    wrapped.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, wrapped.model)
    wrapped.model.zero_grad()
    loss = -mll(wrapped(x), y)
    check_gradients(wrapped.model, loss.sum())
    wrapped.eval()


# -------------------------------------------------------------------------------- Simple GP
class ExactGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_simple_gp(dtype):
    x, y = data(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = ExactGPModel(x, y, likelihood).to(dtype)
    fit(model, likelihood, x, y)
    wrapped = cl.wrap(model, ZERO_MEAN)  # the one added line
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype)
    f = check_prediction(wrapped, model, (test_x,), dtype)
    if dtype == F64:  # log_prob of its own samples: the density of a rank-r degenerate Gaussian
        with torch.no_grad():
            lp = f.log_prob(f.sample(torch.Size([300])))
            dens = f._conditioned._density()
            log_pdet = float(dens.log_pdet)  # sum of the log kept eigenvalues
            r = int(dens.rank)
        expected = -r / 2 * math.log(2 * math.pi) - 0.5 * log_pdet - (r - 2 / 3) / 2
        assert abs(float(lp.median()) - expected) < 3.0
    train_through(wrapped, likelihood, x, y)


# -------------------------------------------------------------------------------- Multitask
class MultitaskGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.MultitaskMean(gpytorch.means.ConstantMean(), num_tasks=2)
        self.covar_module = gpytorch.kernels.MultitaskKernel(
            gpytorch.kernels.RBFKernel(), num_tasks=2, rank=1
        )

    def forward(self, x):
        return gpytorch.distributions.MultitaskMultivariateNormal(
            self.mean_module(x), self.covar_module(x)
        )


@pytest.mark.parametrize("dtype", DTYPES)
def test_multitask_gp(dtype):
    x, y = data(dtype, tasks=2)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
    model = MultitaskGPModel(x, y, likelihood).to(dtype)
    fit(model, likelihood, x, y)
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype)
    f = check_prediction(wrapped, model, (test_x,), dtype, tasks=2)
    assert f._interleaved == model(test_x)._interleaved  # the plain model's layout
    train_through(wrapped, likelihood, x, y)


# -------------------------------------------------------------- Batch-independent multi-output
class BatchIndependentMultitaskGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        batch = torch.Size([2])
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=batch)
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(batch_shape=batch), batch_shape=batch
        )

    def forward(self, x):
        mvn = gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))
        return gpytorch.distributions.MultitaskMultivariateNormal.from_batch_mvn(mvn)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_independent_multioutput_gp(dtype):
    x, y = data(dtype, tasks=2)
    likelihood = gpytorch.likelihoods.MultitaskGaussianLikelihood(num_tasks=2)
    model = BatchIndependentMultitaskGPModel(x, y, likelihood).to(dtype)
    fit(model, likelihood, x, y)
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype)
    check_prediction(wrapped, model, (test_x,), dtype, tasks=2)
    train_through(wrapped, likelihood, x, y)


# ------------------------------------------------------------------------------------- SVGP
class SVGPModel(gpytorch.models.ApproximateGP):
    def __init__(self, inducing_points):
        dist = gpytorch.variational.CholeskyVariationalDistribution(inducing_points.size(0))
        strategy = gpytorch.variational.VariationalStrategy(
            self, inducing_points, dist, learn_inducing_locations=True
        )
        super().__init__(strategy)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel())

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_svgp(dtype):
    x, y = data(dtype)
    model = SVGPModel(x[::4].unsqueeze(-1).clone()).to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.VariationalELBO(likelihood, model, num_data=y.numel())
    opt = torch.optim.Adam([*model.parameters(), *likelihood.parameters()], lr=0.05)
    for _ in range(8):
        opt.zero_grad()
        (-mll(model(x.unsqueeze(-1)), y)).backward()
        opt.step()
    model.eval()
    likelihood.eval()
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype).unsqueeze(-1)
    check_prediction(wrapped, model, (test_x,), dtype)
    # gradients through the wrapper (eval mode: the ELBO itself needs the plain model)
    f = wrapped(test_x)
    check_gradients(model, f.mean.square().sum() + f.variance.sum())


# ---------------------------------------------------------------------------------- KISS-GP
class KissGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        grid_size = gpytorch.utils.grid.choose_grid_size(train_x, 1.0)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.GridInterpolationKernel(
                gpytorch.kernels.RBFKernel(), grid_size=grid_size, num_dims=1
            )
        )

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kiss_gp(dtype):
    """The tutorial's sizes: 1000 training points, as many grid points (CG solves)."""
    torch.manual_seed(0)  # CG's random probes: the same run in any test order
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0, 1, 1000)
    y = torch.sin(x * (4 * math.pi) + torch.randn(x.size(), generator=g) * 0.2)
    x, y = x.to(dtype), y.to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = KissGPModel(x, y, likelihood).to(dtype)
    fit(model, likelihood, x, y)
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype)
    check_prediction(wrapped, model, (test_x,), dtype)
    train_through(wrapped, likelihood, x, y)


# ------------------------------------------------------------------------ Deep Kernel Learning
class FeatureExtractor(torch.nn.Sequential):
    def __init__(self, data_dim):
        super().__init__(
            torch.nn.Linear(data_dim, 32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 16),
            torch.nn.ReLU(),
            torch.nn.Linear(16, 2),
        )


class DKLModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.GridInterpolationKernel(
            gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=2)),
            num_dims=2,
            grid_size=20,
        )
        self.feature_extractor = FeatureExtractor(train_x.size(-1))
        self.scale_to_bounds = gpytorch.utils.grid.ScaleToBounds(-1.0, 1.0)

    def forward(self, x):
        z = self.scale_to_bounds(self.feature_extractor(x))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(z), self.covar_module(z))


@pytest.mark.parametrize("dtype", DTYPES)
def test_deep_kernel_learning(dtype):
    torch.manual_seed(0)
    x, y = data(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = DKLModel(x.unsqueeze(-1), y, likelihood).to(dtype)
    fit(model, likelihood, x.unsqueeze(-1), y, lr=0.01)
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype).unsqueeze(-1)
    check_prediction(wrapped, model, (test_x,), dtype)
    train_through(wrapped, likelihood, x.unsqueeze(-1), y)


# --------------------------------------------------------------------------------- Hadamard
class HadamardGPModel(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.RBFKernel()
        self.task_covar_module = gpytorch.kernels.IndexKernel(num_tasks=2, rank=1)

    def forward(self, x, i):
        covar = self.covar_module(x).mul(self.task_covar_module(i))
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), covar)


@pytest.mark.parametrize("dtype", DTYPES)
def test_hadamard_multitask_gp(dtype):
    g = torch.Generator().manual_seed(0)
    x1, x2 = torch.rand(N_TRAIN // 2, generator=g), torch.rand(N_TRAIN // 2, generator=g)
    y1 = torch.sin(2 * math.pi * x1) + 0.2 * torch.randn(x1.shape, generator=g)
    y2 = torch.cos(2 * math.pi * x2) + 0.2 * torch.randn(x2.shape, generator=g)
    x = torch.cat([x1, x2]).to(dtype)
    i = torch.cat([torch.zeros(x1.numel()), torch.ones(x2.numel())]).long().unsqueeze(-1)
    y = torch.cat([y1, y2]).to(dtype)
    likelihood = gpytorch.likelihoods.GaussianLikelihood()
    model = HadamardGPModel((x, i), y, likelihood).to(dtype)
    fit(model, likelihood, (x, i), y)
    wrapped = cl.wrap(model, ZERO_MEAN)
    test_x = torch.linspace(0, 1, N_TEST, dtype=dtype)
    for task in (0, 1):
        test_i = torch.full((N_TEST, 1), task, dtype=torch.long)
        check_prediction(wrapped, model, (test_x, test_i), dtype)
    f = wrapped(test_x, torch.zeros(N_TEST, 1, dtype=torch.long))
    check_gradients(model, f.mean.square().sum() + f.variance.sum())
