"""Boundary AND conservation constraints in one wrap: every row exact, against dense references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import constraint_layers as cl
from constraint_layers.errors import GridError, IncompatibleConstraintsError
from constraint_layers.testing import ConstraintLayerTests, reference_prediction, rows_of

F64 = torch.float64


class Conv(nn.Module):
    """A deterministic grid model (channel-first, any number of axes)."""

    def __init__(self, ndim: int = 1, channels: int = 1):
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        self.net = conv(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.net(x) + 0.3


class VarianceHead(nn.Module):
    """(mean, variance) on a grid."""

    def __init__(self, ndim: int = 1):
        super().__init__()
        self.mean = Conv(ndim)
        self.logvar = Conv(ndim)

    def forward(self, x):
        return self.mean(x), 0.05 + self.logvar(x).exp()


class FullCovarianceHead(nn.Module):
    """A torch MultivariateNormal over one flat event (batch, N)."""

    def __init__(self, n: int):
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.root = nn.Parameter(0.3 * torch.randn(n, n))

    def forward(self, x):
        cov = self.root @ self.root.T + 0.1 * torch.eye(x.shape[-1], dtype=x.dtype)
        return torch.distributions.MultivariateNormal(self.lin(x), covariance_matrix=cov)


def worst_relative(y: torch.Tensor, constraints, grid=cl.rows.DEFAULT_GRID, inputs=None) -> float:
    brows, crows = rows_of(constraints, y.shape, grid=grid, inputs=inputs)
    u = y.detach().reshape(y.shape[0], -1)
    return max(float(r.relative_residual(u).max()) for r in [*brows, *crows] if r.num_rows)


# --------------------------------------------------------------------------- the mixin, joint
class TestInsulatedRod(ConstraintLayerTests):
    """Neumann 0 at both walls and the total fixed: the heat of an insulated rod."""

    def make_model(self, dtype):
        return Conv().to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 41, dtype=dtype)

    def make_constraints(self):
        return [cl.Neumann(0.0, order=3), cl.Conservation.integral(0.7, extent=2.0)]

    def options(self):
        return {"extent": 2.0}


class TestCavityWallsAndMassPerFrame(ConstraintLayerTests):
    """2D (x, t): Dirichlet walls on x (per-frame values), zero flux in t at the start, and the
    mass of every frame fixed; lift spreads the wall corrections."""

    def make_model(self, dtype):
        return Conv(2).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 17, 9, dtype=dtype)

    def make_constraints(self):
        wall = torch.linspace(0.0, 1.0, 9)
        return [
            cl.Dirichlet(wall, dim=0, side="low"),
            cl.Dirichlet(0.0, dim=0, side="high"),
            cl.Conservation.integral(torch.linspace(0.5, 1.0, 9), dim=0),
        ]

    def options(self):
        return {"lift": 2}


class TestGaussianWallsAndMass(ConstraintLayerTests):
    """A (mean, variance) head conditioned on Dirichlet walls and the total at once."""

    def make_model(self, dtype):
        return VarianceHead().to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 33, dtype=dtype)

    def make_constraints(self):
        return [cl.Dirichlet(0.0), cl.Conservation.integral(1.0)]


class TestGaussianNeumannPeriodic2D(ConstraintLayerTests):
    def make_model(self, dtype):
        return VarianceHead(2).to(dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 12, 10, dtype=dtype)

    def make_constraints(self):
        return [
            cl.Periodic(dim=1),
            cl.Neumann(0.5, dim=0, side="high", order=1),
            cl.Conservation.integral(0.0, dim=(0, 1)),
        ]


# ------------------------------------------------------------------ random problems (hypothesis)
@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 2))
    shape = tuple(draw(st.integers(7, 12)) for _ in range(ndim))
    channels = draw(st.integers(1, 2))
    bcs = []
    for d in range(ndim):
        kind = draw(st.sampled_from(["dirichlet", "neumann", "periodic", "none"]))
        value = draw(st.floats(-2, 2))
        if kind == "dirichlet":
            bcs.append(
                cl.Dirichlet(value, dim=d, side=draw(st.sampled_from(["low", "high", "both"])))
            )
        elif kind == "neumann":
            bcs.append(cl.Neumann(value, dim=d, order=draw(st.integers(1, 3))))
        elif kind == "periodic":
            bcs.append(cl.Periodic(dim=d))
    if not bcs:
        bcs.append(cl.Neumann(draw(st.floats(-2, 2)), dim=0, side="low"))
    axes = (0,) if ndim == 1 else draw(st.sampled_from([(0,), (1,), (0, 1)]))
    total = draw(st.floats(-3, 3))
    con = cl.Conservation.integral(
        total, dim=axes, rule=draw(st.sampled_from(["trapezoid", "right"]))
    )
    lift = draw(st.sampled_from([0, 0, 2]))
    seed = draw(st.integers(0, 2**16))
    return shape, channels, bcs, con, lift, seed


@settings(max_examples=40, deadline=None, derandomize=True)
@given(problems())
def test_random_joint_deterministic_matches_the_dense_reference(problem):
    shape, channels, bcs, con, lift, seed = problem
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(3, channels, *shape, dtype=F64, generator=g)
    pred = cl.functional.Gaussian(y, event_ndim=y.ndim - 1)
    from constraint_layers._engine.dispatch import project

    ref, _ = reference_prediction(pred, [*bcs, con], lift=lift)
    if worst_relative(ref, [*bcs, con]) > 1e-11:  # the rows disagree beyond rounding
        # infeasible in these semantics (a row the boundary step leaves no freedom for, e.g. a
        # frame on a Dirichlet face whose corners a later condition takes): a clear error
        with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
            project(pred, [*bcs, con], lift=lift)
        return
    got = project(pred, [*bcs, con], lift=lift).mean
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10 * (float(ref.abs().max()) + 1))
    assert worst_relative(got, [*bcs, con]) < 1e-12
    again = project(cl.functional.Gaussian(got, event_ndim=y.ndim - 1), [*bcs, con], lift=lift)
    torch.testing.assert_close(
        again.mean, got, rtol=1e-12, atol=1e-12 * (float(got.abs().max()) + 1)
    )


@settings(max_examples=30, deadline=None, derandomize=True)
@given(problems(), st.sampled_from(["variance", "covariance"]))
def test_random_joint_gaussian_matches_dense_conditioning(problem, kind):
    shape, channels, bcs, con, _lift, seed = problem
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(2, channels, *shape, dtype=F64, generator=g)
    n = mean[0].numel()
    if kind == "variance":
        var = 0.1 + torch.rand(mean.shape, dtype=F64, generator=g)
        pred = cl.functional.Gaussian(mean, var, event_ndim=mean.ndim - 1)
    else:
        L = torch.randn(2, n, n, dtype=F64, generator=g) / math.sqrt(n)
        cov = L @ L.mT + 0.1 * torch.eye(n, dtype=F64)
        pred = cl.functional.Gaussian(mean, None, cov, event_ndim=mean.ndim - 1)
    from constraint_layers._engine.dispatch import project

    ref_mean, ref_var = reference_prediction(pred, [*bcs, con])
    if worst_relative(ref_mean, [*bcs, con]) > 1e-11:  # infeasible beyond rounding
        with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
            project(pred, [*bcs, con])
        return
    post = project(pred, [*bcs, con])
    torch.testing.assert_close(post.mean, ref_mean, rtol=1e-9, atol=1e-9)
    var = post.variance
    if var is None:
        var = cov.diagonal(dim1=-2, dim2=-1) - post.downdate.square().sum(-1)
        var = var.reshape(mean.shape)
    torch.testing.assert_close(var, ref_var, rtol=1e-9, atol=1e-9)
    # every row holds where its condition is in charge
    assert worst_relative(post.mean, [*bcs, con]) < 1e-10


# ------------------------------------------------------------------------------ semantics
def test_dirichlet_walls_joint_equals_the_euclidean_projection_onto_all_rows():
    torch.manual_seed(0)
    y = torch.randn(4, 1, 25, dtype=F64)
    cons = [cl.Dirichlet(torch.randn(4, 1), side="low"), cl.Dirichlet(0.5, side="high"),
            cl.Conservation.integral(1.0)]  # fmt: skip
    from constraint_layers._engine.dispatch import project
    from constraint_layers._engine.reference import dense_projection

    got = project(cl.functional.Gaussian(y, event_ndim=2), cons).mean
    brows, crows = rows_of(cons, y.shape)
    ref = dense_projection(y.reshape(4, -1), [*brows, *crows]).reshape(y.shape)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[:, :, -1], torch.full((4, 1), 0.5, dtype=F64))  # bit-exact walls


def test_sequential_composition_violates_what_the_joint_layer_keeps():
    """Not vacuous: one wrapper inside the other breaks whichever ran first."""
    torch.manual_seed(1)
    net = Conv().double()
    x = torch.randn(3, 1, 33, dtype=F64)
    bc, total = cl.Neumann(0.0), cl.Conservation.integral(0.4)
    joint = cl.wrap(net, bc, total)(x)
    assert worst_relative(joint, [bc, total]) < 1e-12
    inner_boundary = cl.wrap(cl.wrap(net, bc), total)(x)
    inner_total = cl.wrap(cl.wrap(net, total), bc)(x)
    assert float(cl.metrics.boundary_error(inner_boundary, [bc]).max()) > 1e-3
    assert float(cl.metrics.conservation_error(inner_total, total).abs().max()) > 1e-3


def test_single_family_results_are_unchanged():
    torch.manual_seed(2)
    y = torch.randn(2, 1, 20, 6, dtype=F64)
    bcs = [cl.Dirichlet(torch.randn(6), dim=0, side="low"), cl.Neumann(1.0, dim=0, side="high")]
    layer = cl.wrap(nn.Identity(), *bcs)
    assert torch.equal(layer(y), cl.functional.enforce_boundary(y, bcs))
    con = cl.Conservation.integral(0.3, dim=0)
    var = torch.rand(2, 1, 20, 6, dtype=F64) + 0.1

    class Head(nn.Module):
        def forward(self, x):
            return x, var

    mean, v = cl.wrap(Head(), con)(y)
    ref = cl.functional.enforce_conservation(y, con, variance=var)
    assert torch.equal(mean, ref.mean) and torch.equal(v, ref.variance)


def test_gaussian_joint_variance_vanishes_at_dirichlet_nodes_and_samples_hold_every_row():
    torch.manual_seed(3)
    n = 21
    head = FullCovarianceHead(n).double()
    model = cl.wrap(head, cl.Dirichlet(0.0), cl.Conservation.integral(2.0))
    x = torch.randn(2, n, dtype=F64)
    post = model(x)
    assert isinstance(post, torch.distributions.MultivariateNormal)
    var = post.covariance_matrix.diagonal(dim1=-2, dim2=-1)
    assert float(var[:, [0, -1]].abs().max()) < 1e-12
    assert float(var[:, 1:-1].min()) > 1e-4
    s = post.rsample(torch.Size([64]))
    w = cl.quadrature.trapezoid(n, dtype=F64)
    assert float(s[..., [0, -1]].abs().max()) < 1e-9
    assert float((s @ w - 2.0).abs().max()) < 1e-9


def test_noise_per_constraint_exact_walls_noisy_total():
    torch.manual_seed(4)
    head = VarianceHead().double()
    x = torch.randn(2, 1, 17, dtype=F64)
    total = cl.Conservation.integral(1.0)
    model = cl.wrap(head, cl.Dirichlet(0.0), total, noise=[0.0, 0.5])
    mean, var = model(x)
    assert torch.equal(mean[..., [0, -1]], torch.zeros(2, 1, 2, dtype=F64))
    assert float(var[..., [0, -1]].abs().max()) < 1e-12
    assert float(cl.metrics.conservation_error(mean, total).abs().max()) > 1e-3  # not exact
    exact = cl.wrap(head, cl.Dirichlet(0.0), total)(x)[0]
    assert float(cl.metrics.conservation_error(exact, total).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="one value per constraint"):
        cl.wrap(head, cl.Dirichlet(0.0), total, noise=[0.0])


def test_gradients_through_the_joint_projection():
    torch.manual_seed(5)
    cons = [cl.Neumann(0.2, side="low", order=2), cl.Dirichlet(-0.1, side="high"),
            cl.Conservation.integral(0.5)]  # fmt: skip
    det = cl.wrap(nn.Identity(), *cons)
    y = torch.randn(2, 1, 12, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(det, (y,))

    class Head(nn.Module):
        def forward(self, inputs):
            mean, var = inputs
            return mean, var

    gauss = cl.wrap(Head(), *cons)
    var = (0.1 + torch.rand(2, 1, 12, dtype=F64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda m, v: gauss((m, v)), (y, var))


def test_incompatible_rows_raise_and_name_them_redundant_rows_are_accepted():
    n = 9
    g0 = torch.zeros(1, n, dtype=F64)
    g0[0, 0] = 1.0  # a "total" that reads the wall node only
    y = torch.randn(2, 1, n, dtype=F64)
    wall = cl.Dirichlet(0.0, side="low")
    for head in (nn.Identity(), None):
        if head is None:

            class Head(nn.Module):
                def forward(self, x):
                    return x, torch.ones_like(x)

            head = Head()
        bad = cl.wrap(head, wall, cl.Conservation(g0, torch.tensor([5.0])))
        with pytest.raises(IncompatibleConstraintsError, match=r"Conservation\(G: \(1, 9\)"):
            bad(y)
        ok = cl.wrap(head, wall, cl.Conservation(g0, torch.tensor([0.0])))  # redundant, consistent
        out = ok(y)
        mean = out[0] if isinstance(out, tuple) else out
        assert torch.equal(mean[..., 0], torch.zeros(2, 1, dtype=F64))
    # duplicate conservation rows with agreeing totals: accepted; conflicting: named
    twice = [cl.Conservation.integral(1.0), cl.Conservation.integral(1.0)]
    head = VarianceHead().double()
    mean, _ = cl.wrap(head, cl.Dirichlet(0.0), *twice)(y)
    assert float(cl.metrics.conservation_error(mean, twice[0]).abs().max()) < 1e-12
    with pytest.raises(IncompatibleConstraintsError, match="cannot hold together"):
        cl.wrap(head, cl.Dirichlet(0.0), twice[0], cl.Conservation.integral(2.0))(y)


def test_joint_with_given_values_and_normalizer():
    class Affine:
        def transform(self, u):
            return (u - 1.0) / 2.0

        def inverse_transform(self, u):
            return 2.0 * u + 1.0

    torch.manual_seed(6)
    net = Conv().double()
    model = cl.wrap(net, cl.Dirichlet(cl.Given("wall")), cl.Conservation.integral(cl.Given("mass")),
                    normalizer=Affine())  # fmt: skip
    x = torch.randn(3, 1, 15, dtype=F64)
    wall, mass = torch.randn(3, 1, dtype=F64), torch.randn(3, 1, dtype=F64)
    y = Affine().inverse_transform(model(x, wall=wall, mass=mass))  # physical units
    torch.testing.assert_close(y[..., 0], wall, rtol=1e-12, atol=1e-12)
    cons = [cl.Dirichlet(wall), cl.Conservation.integral(mass)]
    assert worst_relative(y, cons) < 1e-12
    assert "normalizer" not in "".join(model.state_dict())


def test_refine_mode_composes_with_conservation():
    pytest.importorskip("neuralop")
    from _models import fno

    model = fno((6,), hidden=6, n_layers=2)
    total = cl.Conservation.integral(0.25)
    wrapped = cl.wrap(model, cl.Neumann(0.0), total, mode="refine")
    y = wrapped(torch.randn(2, 1, 40))
    assert len(wrapped.refinements) == 2
    assert worst_relative(y, [cl.Neumann(0.0), total]) < 1e-5


def test_joint_needs_dim_on_multi_axis_grids():
    with pytest.raises(GridError, match="without dim="):
        cl.wrap(Conv(2), cl.Neumann(0.0), cl.Conservation.integral(0.0, dim=0))(
            torch.randn(1, 1, 8, 8)
        )


def test_every_adapter_serves_every_family():
    """An ensemble (mixture adapter) conditioned on walls and a total: each member, then moments."""
    torch.manual_seed(7)
    members = [VarianceHead().double() for _ in range(3)]
    ens = cl.adapters.Ensemble(members)
    x = torch.randn(2, 1, 19, dtype=F64)
    walls = cl.Dirichlet(0.0)
    mean, var = cl.wrap(ens, walls)(x)
    assert torch.equal(mean[..., [0, -1]], torch.zeros(2, 1, 2, dtype=F64))
    assert float(var[..., [0, -1]].abs().max()) < 1e-12
    total = cl.Conservation.integral(-0.5)
    mean, var = cl.wrap(ens, walls, total)(x)
    assert worst_relative(mean, [walls, total]) < 1e-12
    points = cl.adapters.Ensemble([Conv().double() for _ in range(4)])  # point predictions
    mean, var = cl.wrap(points, walls, total)(x)
    assert worst_relative(mean, [walls, total]) < 1e-12
