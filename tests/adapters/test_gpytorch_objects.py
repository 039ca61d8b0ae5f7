"""The posterior objects a wrapped GP returns, used as gpytorch users use them (issue 21):
pickling, copies, the density of their own samples, the multitask layout, torch MVN heads, a GP
left in train mode, and the gradient of ``TaskMajor``."""

from __future__ import annotations

import io
import math
import pickle
import warnings

import pytest
import torch

import constraint_layers as cl

gpytorch = pytest.importorskip("gpytorch")

from test_gpytorch_posterior import (  # noqa: E402
    MASS,
    TWO_PI,
    TWO_ROWS,
    DistributionHead,
    grid,
    make_gp,
    make_multitask_gp,
    residual,
    subspace_density,
)

from constraint_layers.adapters._gpytorch_ops import TaskMajor  # noqa: E402
from constraint_layers.adapters.gpytorch import ConstraintDroppedWarning  # noqa: E402

F64, F32 = torch.float64, torch.float32
SHAPE = (5, 8)
TOL = {F64: 1e-12, F32: 1e-5}


def posterior(dtype=F64, noise=0.0):
    model = cl.wrap(make_gp(dtype), MASS, grid_shape=SHAPE, noise=noise)
    with torch.no_grad():
        return model(grid(*SHAPE, dtype))


def rows(shape=SHAPE):
    G, b = MASS.dense((1, 1, *shape))
    return G, b[0]


def gap(samples, G, b):
    """max |G s - b| / (|G| |s| + |b|)."""
    s = samples.double().reshape(-1, G.shape[-1])
    return float(((s @ G.mT - b).abs() / (s.abs() @ G.abs().mT + b.abs())).max())


# ------------------------------------------------------------------------------- pickling
def round_trips(f):
    yield pickle.loads(pickle.dumps(f))
    buf = io.BytesIO()
    torch.save(f, buf)
    buf.seek(0)
    yield torch.load(buf, weights_only=False)  # gpytorch objects, as gpytorch users load them


@pytest.mark.parametrize("dtype", [F64, F32])
def test_noise_free_posterior_pickles_and_saves(dtype):
    f = posterior(dtype)
    G, b = rows()
    with torch.no_grad():
        x = f.sample(torch.Size([4]))
        lp = f.log_prob(x)
        for g in round_trips(f):
            assert type(g) is type(f)
            torch.testing.assert_close(g.mean, f.mean, rtol=0, atol=0)
            torch.testing.assert_close(g.covariance_matrix, f.covariance_matrix, rtol=0, atol=0)
            torch.testing.assert_close(g.log_prob(x), lp, rtol=0, atol=0)
            torch.testing.assert_close(g.entropy(), f.entropy(), rtol=0, atol=0)
            assert gap(g.sample(torch.Size([8])), G, b) < TOL[dtype]
            h = g * 2.0  # a copy of the loaded object keeps the constraint too
            assert gap(h.sample(torch.Size([4])), G, 2 * b) < TOL[dtype]
            torch.testing.assert_close(h.log_prob(2 * x), (f * 2.0).log_prob(2 * x), rtol=0, atol=0)


def test_copies_and_multitask_posteriors_pickle():
    f = posterior(F64)
    gp = make_multitask_gp(F64)
    task1 = cl.Conservation.integral(1.0, dim=1, extent=TWO_PI, channels=1)
    ensemble = cl.adapters.Ensemble([make_gp(F64, seed=i) for i in range(2)])
    with torch.no_grad():
        mt = cl.wrap(gp, task1, grid_shape=(4, 6))(grid(4, 6))
        mixture = cl.wrap(ensemble, MASS, grid_shape=SHAPE)(grid(*SHAPE))
    for obj in (f * 2.0, f + 1.0, f[..., :], f.expand(torch.Size([2])), mt, mixture):
        with torch.no_grad():
            x = obj.sample(torch.Size([3]))
            for g in round_trips(obj):
                torch.testing.assert_close(g.log_prob(x), obj.log_prob(x), rtol=0, atol=0)
                assert bool(torch.isfinite(g.log_prob(g.sample(torch.Size([2])))).all())


# --------------------------------------------------------------------------------- copies
def dense_reference(f, x, G):
    """The density on {G u = G mean} from the dense covariance (float64 reference)."""
    return subspace_density(f.mean.double(), f.covariance_matrix.double(), G, x.double())[0]


@pytest.mark.parametrize("dtype", [F64, F32])
def test_copies_keep_the_constraint(dtype):
    f = posterior(dtype)
    G, b = rows()
    c = 1.0 if dtype == F64 else 1e-4  # float32 log_prob: rounding of 40 values near 1
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    cases = {  # copy, its rows (G', b'), how a sample of f maps to it
        "* 2.0": (lambda: f * 2.0, (G, 2 * b), lambda s: 2 * s),
        "/ -4.0": (lambda: f / -4.0, (G, -b / 4), lambda s: s / -4),
        "+ 0.5": (lambda: f + 0.5, (G, b + 0.5 * G.sum(-1)), lambda s: s + 0.5),
        "0.0 +": (lambda: 0.0 + f, (G, b), lambda s: s),
        "[..., :]": (lambda: f[..., :], (G, b), lambda s: s),
        "[:]": (lambda: f[:], (G, b), lambda s: s),
        "[..., perm]": (lambda: f[..., perm], (G[:, perm], b), lambda s: s[..., perm]),
        "expand": (
            lambda: f.expand(torch.Size([3])),
            (G, b),
            lambda s: s.unsqueeze(-2).expand(6, 3, 40),
        ),
    }
    with torch.no_grad():
        s = f.sample(torch.Size([6]))
        lp = f.log_prob(s)
        rank = int(f._conditioned._density().rank)  # 35 in float64; float32 rounds more away
        for name, (make, (G2, b2), move) in cases.items():
            with warnings.catch_warnings():
                warnings.simplefilter("error", ConstraintDroppedWarning)
                g = make()
            assert isinstance(g, type(f)), name
            draws = g.sample(torch.Size([8]))
            assert gap(draws, G2, b2) < TOL[dtype], name
            assert gap(g.rsample(torch.Size([2])), G2, b2) < TOL[dtype], name
            moved = move(s)
            expected = lp if "expand" not in name else lp.unsqueeze(-1).expand(6, 3)
            if name.startswith(("*", "/")):  # density on a scaled subspace: |c|^-rank
                scale = 2.0 if name.startswith("*") else 0.25
                expected = lp - rank * math.log(scale)
            torch.testing.assert_close(
                g.log_prob(moved).double(), expected.double(), rtol=0, atol=c
            )
            assert float(g.log_prob(moved + 1e-2 * torch.randn_like(moved)).max()) == -math.inf
            if dtype == F64 and "expand" not in name:  # against the dense reference
                ref = dense_reference(g, draws[:3], G2)
                torch.testing.assert_close(g.log_prob(draws[:3]), ref, rtol=1e-6, atol=1e-6)


def test_copies_that_lose_the_constraint_warn_and_come_back_plain():
    f = posterior(F64)
    model = cl.wrap(make_gp(F64), MASS, grid_shape=SHAPE)
    with torch.no_grad():
        batched = model(grid(*SHAPE).expand(2, 40, 2))
    other = gpytorch.distributions.MultivariateNormal(
        torch.zeros(40, dtype=F64), torch.eye(40, dtype=F64)
    )
    cases = {
        "[..., :10]": lambda: f[..., :10],
        "[..., 3]": lambda: f[..., 3],
        "add_jitter": lambda: f.add_jitter(1e-3),
        "unsqueeze": lambda: f.unsqueeze(0),
        "+ mvn": lambda: f + other,
        "* 0": lambda: f * 0.0,
        "batch index": lambda: batched[0],
    }
    for name, make in cases.items():
        with pytest.warns(ConstraintDroppedWarning, match="no longer carries the constraint"):
            g = make()
        assert type(g) is gpytorch.distributions.MultivariateNormal, name
    assert (f * 1) is f  # gpytorch's own shortcut


# ------------------------------------------------------------- log_prob of its own samples
def expected_log_density(f):
    """E[log p(s)] for s ~ f, a degenerate Gaussian of rank r with eigenvalues lam:
    -r/2 log(2 pi) - 1/2 sum log lam - r/2; the median of -|z|^2/2 (chi-square, r degrees) is
    about (r - 2/3) / 2 instead of r / 2."""
    cov = f.covariance_matrix.double()
    lam = torch.linalg.eigvalsh(0.5 * (cov + cov.mT))
    r = f._conditioned._density().rank
    lam = lam[-int(r) :]
    return float(-r / 2 * math.log(2 * math.pi) - 0.5 * lam.log().sum() - (r - 2 / 3) / 2), int(r)


@pytest.mark.parametrize("dtype", [F64, F32])
def test_log_prob_of_its_own_samples(dtype):
    f = posterior(dtype)
    with torch.no_grad():
        s = f.sample(
            torch.Size([400]),
        )
        lp = f.log_prob(s).double()
    expected, rank = expected_log_density(f)
    assert rank == 40 - 5 or dtype == F32  # float32: fewer directions above its rounding
    assert abs(float(lp.median()) - expected) < 3.0


# ------------------------------------------------------------------------------- multitask
@pytest.mark.parametrize("dtype", [F64, F32])
def test_multitask_layout_is_the_plain_models(dtype):
    gp = make_multitask_gp(dtype)
    x = grid(4, 6, dtype)
    task1 = cl.Conservation.integral(1.0, dim=1, extent=TWO_PI, channels=1)
    with torch.no_grad():
        post, plain = cl.wrap(gp, task1, grid_shape=(4, 6))(x), gp(x)
        s = post.sample(torch.Size([4]))
    assert post._interleaved == plain._interleaved is True
    # the dense reference, task-major, mapped back to the interleaved order gpytorch uses
    perm = torch.arange(48).reshape(24, 2).mT.reshape(-1)  # task-major j <- interleaved perm[j]
    cov = plain.covariance_matrix.double()[perm][:, perm]
    G, b = task1.dense((1, 2, 4, 6))
    ref = cl.functional.condition_gaussian(
        plain.mean.mT.reshape(-1).double(), G, b[0], covariance=0.5 * (cov + cov.mT)
    )
    inv = torch.argsort(perm)
    ref_cov = ref.covariance()[inv][:, inv]  # interleaved: index i * T + t
    tol = 1e-9 if dtype == F64 else 1e-4
    torch.testing.assert_close(post.covariance_matrix.double(), ref_cov, rtol=tol, atol=tol)
    i, t = 7, 1  # the old way: point i, task t at i * T + t
    torch.testing.assert_close(
        post.covariance_matrix[i * 2 + t, i * 2 + t].double(),
        post.variance[i, t].double(),
        rtol=tol,
        atol=tol,
    )
    torch.testing.assert_close(
        post.variance.double(), ref_cov.diagonal().reshape(24, 2), rtol=tol, atol=tol
    )
    flat = s.reshape(4, -1)[:, perm]  # (points, tasks) samples read task-major
    assert gap(flat, G, b[0]) < TOL[dtype]
    lazy = post.lazy_covariance_matrix
    R = lazy.root_decomposition().root.to_dense().double()
    torch.testing.assert_close(R @ R.mT, ref_cov, rtol=tol * 100, atol=tol * 100)


# ------------------------------------------------------------------------ torch MVN heads
@pytest.mark.parametrize("kind", ["full", "lowrank"])
@pytest.mark.parametrize("dtype", [F64, F32])
def test_torch_head_log_prob_is_the_degenerate_density(kind, dtype):
    torch.manual_seed(0)
    head = DistributionHead(kind).to(dtype)
    model = cl.wrap(head, TWO_ROWS)
    x = torch.randn(3, 3, dtype=dtype)
    with torch.no_grad():
        out = model(x)
        s = out.sample(torch.Size([5]))
        lp = out.log_prob(s)
        raw = head(x)
        ref = cl.functional.condition_gaussian(
            raw.mean.double(), TWO_ROWS.G, TWO_ROWS.b, covariance=raw.covariance_matrix.double()
        )
        cov = ref.covariance()
        refs = torch.stack(
            [
                subspace_density(ref.mean[k], cov[k], TWO_ROWS.G, s[:, k].double())[0]
                for k in range(3)
            ],
            -1,
        )
        h = torch.stack(
            [
                subspace_density(ref.mean[k], cov[k], TWO_ROWS.G, s[0, k].double())[1]
                for k in range(3)
            ]
        )
    assert isinstance(out, torch.distributions.MultivariateNormal)
    tol = 1e-6 if dtype == F64 else 2e-2
    torch.testing.assert_close(lp.double(), refs, rtol=tol, atol=tol)
    torch.testing.assert_close(out.entropy().double(), h, rtol=tol, atol=tol)
    assert float(out.log_prob(s + 0.1).max()) == -math.inf  # off the constraint set
    torch.testing.assert_close(out.expand(torch.Size([2, 3])).log_prob(s[:2]), lp[:2])
    # reparameterised samples carry gradients into the head (QR has none at zero pivots)
    r = model(x).rsample(torch.Size([4]))
    assert gap(r.detach(), TWO_ROWS.G, TWO_ROWS.b) < (1e-12 if dtype == F64 else 1e-5)
    r.square().sum().backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in head.parameters())
    # the triangular root and the sampling root give the same covariance
    R = out._root.double()
    torch.testing.assert_close(R @ R.mT, out.covariance_matrix.double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- train mode
def test_exact_gp_left_in_train_mode_says_to_call_eval():
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS, grid_shape=SHAPE)
    model.train()
    with pytest.raises(ValueError, match=r"train mode.*Call \.eval\(\)"):
        model(grid(*SHAPE))
    model.eval()
    with torch.no_grad():
        assert residual(model(grid(*SHAPE)).mean, (1, *SHAPE)) < TOL[F64]


# ------------------------------------------------------------------------------ TaskMajor
def test_task_major_gradients_match_the_dense_permutation():
    from linear_operator.operators import DenseLinearOperator

    g = torch.Generator().manual_seed(0)
    n, t = 4, 3
    A0 = torch.randn(n * t, n * t, dtype=F64, generator=g)
    perm = torch.arange(n * t).reshape(n, t).mT.reshape(-1)
    u = torch.randn(2, n * t, dtype=F64, generator=g)
    v = torch.randn(n * t, 2, dtype=F64, generator=g)
    for name, fn in {
        "matmul": lambda M: M @ v,
        "rmatmul": lambda M: u @ M,
        "diagonal": lambda M: (
            M.diagonal(dim1=-2, dim2=-1) if isinstance(M, torch.Tensor) else M.diagonal()
        ),
    }.items():
        A = (A0 @ A0.mT).requires_grad_(True)
        out = fn(TaskMajor(DenseLinearOperator(A), n, t))
        out = out.to_dense() if hasattr(out, "to_dense") else out
        (ga,) = torch.autograd.grad(
            (out * torch.arange(out.numel(), dtype=F64).reshape(out.shape)).sum(), A
        )
        B = (A0 @ A0.mT).requires_grad_(True)
        ref = fn(B[perm][:, perm])
        (gb,) = torch.autograd.grad(
            (ref * torch.arange(ref.numel(), dtype=F64).reshape(ref.shape)).sum(), B
        )
        torch.testing.assert_close(out, ref, msg=name)
        torch.testing.assert_close(ga, gb, msg=name)


# ------------------------------------------------------------------- gradients of the root
def test_root_gradients_are_the_covariances():
    """The sampling root's gradient (no eigendecomposition backward): ``d(R R^T) = dSigma~``
    where the numerical rank is N - M (every dropped direction is a constraint row)."""
    gp = make_gp(F64)
    model = cl.wrap(gp, MASS, grid_shape=SHAPE)
    W = torch.randn(40, 40, dtype=F64, generator=torch.Generator().manual_seed(0))
    W = W + W.mT

    def grads(which):
        gp.zero_grad()
        f = model(grid(*SHAPE))
        if which == "root":
            R = f.lazy_covariance_matrix.root_decomposition().root.to_dense()
            S = R @ R.mT
        else:
            S = f.covariance_matrix
        (S * W).sum().backward()
        return [p.grad.clone() for p in gp.parameters() if p.grad is not None]

    assert int(model(grid(*SHAPE))._conditioned._density().rank) == 40 - 5
    g_root, g_cov = grads("root"), grads("covariance")
    assert len(g_root) == len(g_cov) > 0
    for a, b in zip(g_root, g_cov):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_lanczos_root_conserves():
    """Above max_cholesky_size (or asked for): the model's own root, projected."""
    f = posterior(F64)
    G, b = rows()
    with torch.no_grad():
        R = f.lazy_covariance_matrix.root_decomposition(method="lanczos").root.to_dense()
        assert float((G @ R).abs().max()) < 1e-12 * float(R.abs().max())
        g = posterior(F64)
        with gpytorch.settings.max_cholesky_size(10):  # sampling above the dense size
            s = g.sample(torch.Size([8]))
    assert gap(s, G, b) < TOL[F64]


def test_multitask_copies():
    gp = make_multitask_gp(F64)
    task1 = cl.Conservation.integral(1.0, dim=1, extent=TWO_PI, channels=1)
    G, b = task1.dense((1, 2, 4, 6))
    b = b[0]
    with torch.no_grad():
        f = cl.wrap(gp, task1, grid_shape=(4, 6))(grid(4, 6))
        s = f.sample(torch.Size([3]))
        lp = f.log_prob(s)
        task_major = lambda u: u.mT.reshape(*u.shape[:-2], -1)  # noqa: E731
        for name, g, b2, moved in (
            ("* 3", f * 3.0, 3 * b, 3 * s),
            ("+ 1", f + 1.0, b + G.sum(-1), s + 1),
            ("[:]", f[:], b, s),
            ("expand", f.expand(torch.Size([2])), b, s.unsqueeze(1).expand(3, 2, 24, 2)),
        ):
            assert isinstance(g, type(f)) and g._interleaved == f._interleaved, name
            assert g.mean.shape[-2:] == (24, 2), name
            assert gap(task_major(g.sample(torch.Size([4]))), G, b2) < TOL[F64], name
            expected = (
                lp if name != "* 3" else lp - int(f._conditioned._density().rank) * math.log(3)
            )
            if name == "expand":
                expected = lp.unsqueeze(-1).expand(3, 2)
            torch.testing.assert_close(g.log_prob(moved), expected, rtol=1e-6, atol=1e-6)
        with pytest.warns(ConstraintDroppedWarning):
            sub = f[..., 0]  # one task
        assert type(sub) is gpytorch.distributions.MultivariateNormal


def test_interleaved_order_from_any_task_major_covariance():
    """The write-back to the model's order works for a TaskMajor view and for a covariance the
    conditioning evaluated (a task-major tensor) alike."""
    from linear_operator.operators import DenseLinearOperator

    from constraint_layers.adapters._gpytorch_ops import interleaved

    A = torch.randn(12, 12, dtype=F64, generator=torch.Generator().manual_seed(1))
    A = A @ A.mT
    view = TaskMajor(DenseLinearOperator(A), 4, 3)
    op1, perm1 = interleaved(view, 4, 3)
    op2, perm2 = interleaved(view.to_dense(), 4, 3)
    assert torch.equal(perm1, perm2)
    torch.testing.assert_close(op1.to_dense(), A, rtol=0, atol=0)
    torch.testing.assert_close(op2.to_dense(), A, rtol=0, atol=0)
