"""Constraints on point clouds: exact, equal to dense float64 references, jointly and alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import constraint_layers as cl
from constraint_layers.errors import GridError, IncompatibleConstraintsError

F64 = torch.float64
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


class Identity(nn.Module):
    def forward(self, x):
        return x.clone()


class Head(nn.Module):
    """(mean, variance) at points."""

    def forward(self, x):
        return x[0].clone(), x[1].clone()


def dense_rows(B, P, C, *, fixed=(), normals=(), integrals=()):
    """C (B, M, P*C), d (B, M) written entry by entry (an independent reference).

    fixed: list of (point, channel, value); normals: list of (point, n (B, C) over all channels,
    value (B,)); integrals: list of (weights (P,), channel, total)."""
    rows, rhs = [], []
    for p, c, v in fixed:
        r = torch.zeros(B, P * C, dtype=F64)
        r[:, p * C + c] = 1.0
        rows.append(r)
        rhs.append(torch.full((B,), float(v), dtype=F64))
    for p, n, v in normals:
        r = torch.zeros(B, P * C, dtype=F64)
        for c in range(C):
            r[:, p * C + c] = n[:, c]
        rows.append(r)
        rhs.append(v.to(F64))
    for w, c, t in integrals:
        r = torch.zeros(B, P * C, dtype=F64)
        for p in range(P):
            r[:, p * C + c] = w[p]
        rows.append(r)
        rhs.append(torch.full((B,), float(t), dtype=F64))
    return torch.stack(rows, 1), torch.stack(rhs, 1)


def dense_reference(u, G, d, var=None):
    """Projection (variance None) or conditioning on G u = d, dense float64 pseudo-inverse."""
    B = u.shape[0]
    x = u.reshape(B, -1).to(F64)
    W = torch.diag_embed(var.reshape(B, -1).to(F64)) if var is not None else None
    WG = G.mT if W is None else W @ G.mT
    A = G @ WG
    Ap = torch.linalg.pinv(A, hermitian=True)
    r = (G @ x.unsqueeze(-1)).squeeze(-1) - d
    mean = x - (WG @ (Ap @ r.unsqueeze(-1))).squeeze(-1)
    if W is None:
        return mean.reshape(u.shape), None
    post = W - WG @ Ap @ WG.mT
    return mean.reshape(u.shape), post.diagonal(dim1=-2, dim2=-1).reshape(u.shape)


def _case(dtype, seed, B=3, P=12, C=3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(B, P, C, generator=g, dtype=F64).to(dtype)
    npts = torch.tensor([2, 5, 7])  # normal rows at these points over channels (0, 1)
    normals = torch.randn(len(npts), 2, generator=g, dtype=F64)
    nval = torch.randn(B, len(npts), generator=g, dtype=F64)
    w = torch.rand(P, generator=g, dtype=F64) + 0.1
    return u, npts, normals, nval, w


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_joint_equals_dense_euclidean_projection(dtype, seed):
    u, npts, normals, nval, w = _case(dtype, seed)
    B, P, C = u.shape
    cons = [
        cl.Dirichlet(0.5, points=[0, 5], channels=(0,)),  # point 5 also carries a normal row
        cl.NormalComponent(nval, normals=normals, points=npts, channels=(0, 1)),
        cl.Conservation.integral(1.25, weights=w, channels=(1, 2)),
    ]
    y = cl.wrap(Identity(), *cons, layout="points")(u)
    assert y.dtype == dtype and y.shape == u.shape
    n_full = torch.zeros(len(npts), C, dtype=F64)
    n_full[:, :2] = normals
    G, d = dense_rows(
        B,
        P,
        C,
        fixed=[(0, 0, 0.5), (5, 0, 0.5)],
        normals=[(int(p), n_full[i].expand(B, C), nval[:, i]) for i, p in enumerate(npts)],
        integrals=[(w, 1, 1.25), (w, 2, 1.25)],
    )
    ref, _ = dense_reference(u, G, d)
    scale = float(u.abs().max()) + 1
    torch.testing.assert_close(y.to(F64), ref, rtol=0, atol=TOL[dtype] * scale * 10)
    r = (G @ y.reshape(B, -1, 1).to(F64)).squeeze(-1) - d
    assert float(r.abs().max()) <= TOL[dtype] * scale * 10
    assert bool((y[:, [0, 5], 0] == 0.5).all())  # coordinate rows to the bit


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dirichlet_points_exact_and_nothing_else_moves(dtype):
    u = torch.randn(4, 20, 2, dtype=dtype)
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[3, 4, 17]] = True
    value = torch.randn(4, 20, 2, dtype=dtype)
    y = cl.wrap(Identity(), cl.Dirichlet(value, points=mask))(u)
    assert torch.equal(y[:, mask], value[:, mask])
    assert torch.equal(y[:, ~mask], u[:, ~mask])
    # indices with one value per selected point
    v = torch.randn(3, 1)
    y = cl.wrap(Identity(), cl.Dirichlet(v, points=torch.tensor([3, 4, 17]), channels=1))(u)
    assert torch.equal(y[:, [3, 4, 17], 1], v[:, 0].to(dtype).expand(4, 3))
    keep = torch.ones_like(u, dtype=torch.bool)
    keep[:, [3, 4, 17], 1] = False
    assert torch.equal(y[keep], u[keep])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_normal_component_is_the_closed_form_projection(dtype):
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 9, 3, generator=g).to(dtype)
    pts = torch.tensor([1, 4, 8])
    n = torch.randn(3, 3, generator=g).to(dtype)
    val = torch.randn(2, 3, generator=g).to(dtype)
    y = cl.wrap(Identity(), cl.NormalComponent(val, normals=n, points=pts, channels=(0, 1, 2)))(u)
    x = u[:, pts].to(F64)
    n64 = n.to(F64)
    ref = x - n64 * (((x * n64).sum(-1) - val.to(F64)) / n64.square().sum(-1)).unsqueeze(-1)
    torch.testing.assert_close(y[:, pts].to(F64), ref, rtol=0, atol=10 * TOL[dtype])
    others = torch.ones(9, dtype=torch.bool)
    others[pts] = False
    assert torch.equal(y[:, others], u[:, others])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weighted_integral_is_its_projection(dtype):
    u = torch.randn(3, 50, 2, dtype=dtype)
    w = torch.rand(50, dtype=F64) + 0.5
    total = torch.tensor([[1.0, -2.0]])  # per channel
    y = cl.wrap(Identity(), cl.Conservation.integral(total, weights=w))(u)
    x = u.to(F64)
    r = (x * w[:, None]).sum(1) - total.to(F64)
    ref = x - w[None, :, None] * (r / w.square().sum()).unsqueeze(1)
    torch.testing.assert_close(y.to(F64), ref, rtol=0, atol=10 * TOL[dtype])


def test_weights_per_time_frame_rows():
    """R weight rows: one total per (row, channel), e.g. mass per time frame at (t, x) points."""
    u = torch.randn(2, 30, 1, dtype=F64)
    frame = torch.arange(30) // 10
    w = torch.stack([(frame == k).to(F64) * 0.1 for k in range(3)])  # (3, 30)
    totals = torch.tensor([[0.0], [1.0], [2.0]], dtype=F64)
    y = cl.wrap(Identity(), cl.Conservation.integral(totals, weights=w))(u)
    got = (w @ y[..., 0].mT).mT
    torch.testing.assert_close(got, totals[:, 0].expand(2, 3), rtol=0, atol=1e-13)


def test_gaussian_diagonal_equals_dense_conditioning():
    u, npts, normals, nval, w = _case(torch.float64, 7)
    B, P, C = u.shape
    var = torch.rand(B, P, C, dtype=F64) + 0.1
    cons = [
        cl.Dirichlet(0.0, points=[0], channels=(0, 1)),
        cl.NormalComponent(nval, normals=normals, points=npts, channels=(0, 1)),
        cl.Conservation.integral(0.3, weights=w, channels=2),
    ]
    mean, v = cl.wrap(Head(), *cons, layout="points")((u, var))
    n_full = torch.zeros(len(npts), C, dtype=F64)
    n_full[:, :2] = normals
    G, d = dense_rows(
        B, P, C,
        fixed=[(0, 0, 0.0), (0, 1, 0.0)],
        normals=[(int(p), n_full[i].expand(B, C), nval[:, i]) for i, p in enumerate(npts)],
        integrals=[(w, 2, 0.3)],
    )  # fmt: skip
    ref_mean, ref_var = dense_reference(u, G, d, var)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(v, ref_var, rtol=0, atol=1e-12)
    assert bool((v <= var + 1e-15).all())
    assert bool((v[:, 0, :2] == 0).all())


def test_general_paths_equal_dense_reference():
    """Two normal rows at one point and a full covariance go through the general engine."""
    g = torch.Generator().manual_seed(11)
    B, P, C = 2, 6, 3
    u = torch.randn(B, P, C, generator=g, dtype=F64)
    n1, n2 = torch.randn(1, 3, generator=g, dtype=F64), torch.randn(1, 3, generator=g, dtype=F64)
    cons = [
        cl.NormalComponent(0.2, normals=n1, points=[3], channels=(0, 1, 2)),
        cl.NormalComponent(-0.1, normals=n2, points=[3], channels=(0, 1, 2)),
        cl.Dirichlet(1.0, points=[1], channels=(2,)),
    ]
    y = cl.wrap(Identity(), *cons)(u)
    G, d = dense_rows(
        B, P, C,
        fixed=[(1, 2, 1.0)],
        normals=[(3, n1.expand(B, C), torch.full((B,), 0.2, dtype=F64)),
                 (3, n2.expand(B, C), torch.full((B,), -0.1, dtype=F64))],
    )  # fmt: skip
    ref, _ = dense_reference(u, G, d)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_bounds_jointly_with_point_rows():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(3, 40, 1, generator=g, dtype=F64)
    w = torch.full((40,), 1 / 40, dtype=F64)
    cons = [
        cl.Dirichlet(0.0, points=[0, 39]),
        cl.Conservation.integral(0.4, weights=w),
        cl.Bounds(lower=0.0),
    ]
    y = cl.wrap(Identity(), *cons)(u)
    assert bool((y >= 0).all())
    assert bool((y[:, [0, 39]] == 0).all())
    torch.testing.assert_close((y[..., 0] * w).sum(-1), torch.full((3,), 0.4, dtype=F64))


def test_per_sample_normals_through_given():
    g = torch.Generator().manual_seed(2)
    u = torch.randn(4, 10, 2, generator=g, dtype=F64)
    normals = torch.randn(4, 3, 2, generator=g, dtype=F64)  # (batch, K, d): per sample
    c = cl.NormalComponent(0.0, normals=cl.Given("normals"), points=[0, 4, 9], channels=(0, 1))
    model = cl.wrap(Identity(), c)
    y = model(u, normals=normals)
    dot = (y[:, [0, 4, 9]] * normals).sum(-1)
    assert float(dot.abs().max()) < 1e-12
    y2 = model(u, normals=normals.flip(0))
    assert float((y2[:, [0, 4, 9]] * normals.flip(0)).sum(-1).abs().max()) < 1e-12


def test_gradcheck_through_every_point_row():
    g = torch.Generator().manual_seed(4)
    u = torch.randn(2, 7, 2, generator=g, dtype=F64, requires_grad=True)
    var = (torch.rand(2, 7, 2, generator=g, dtype=F64) + 0.5).requires_grad_()
    n = torch.randn(2, 2, generator=g, dtype=F64)
    w = torch.rand(7, generator=g, dtype=F64) + 0.1
    cons = [
        cl.Dirichlet(0.3, points=[6], channels=0),
        cl.NormalComponent(0.1, normals=n, points=[1, 2], channels=(0, 1)),
        cl.Conservation.integral(0.5, weights=w),
    ]
    det = cl.wrap(Identity(), *cons)
    assert torch.autograd.gradcheck(lambda x: det(x), (u,))
    gau = cl.wrap(Head(), *cons, layout="points")
    assert torch.autograd.gradcheck(lambda x, s: gau((x, s)), (u, var))


def test_unbatched_one_channel_and_errors():
    u = torch.randn(15, dtype=F64)  # (n_points,) one channel, via a (batch, n_points) model
    y = cl.wrap(Identity(), cl.Dirichlet(2.0, points=[3]), layout="points")(u.unsqueeze(0))
    assert float(y[0, 3]) == 2.0
    with pytest.raises(GridError, match="weights"):
        cl.wrap(Identity(), cl.Dirichlet(0.0, points=[1]), cl.Conservation.integral(0.0))
    with pytest.raises(GridError, match="layout='grid'"):
        cl.wrap(Identity(), cl.Dirichlet(0.0, points=[1]), layout="grid")
    with pytest.raises(GridError, match="face of a grid"):
        cl.wrap(Identity(), cl.Neumann(0.0), layout="points")
    with pytest.raises(TypeError, match="describe faces of a grid"):
        cl.Dirichlet(0.0, points=[1], dim=1)
    with pytest.raises(TypeError, match="describe a grid"):
        cl.Conservation.integral(0.0, weights=torch.ones(3), dim=1)
    with pytest.raises(ValueError, match="out of range"):
        cl.wrap(Identity(), cl.Dirichlet(0.0, points=[20]))(torch.randn(1, 5, 1))
    with pytest.raises(ValueError, match="normals must be a tensor"):
        c = cl.NormalComponent(0.0, normals=torch.ones(2, 3), points=[0, 1], channels=(0, 1))
        cl.wrap(Identity(), c)(torch.randn(1, 5, 2))


def test_incompatible_point_rows_raise():
    u = torch.randn(1, 5, 2, dtype=F64)
    cons = [
        cl.Dirichlet(1.0, points=[2]),  # both channels held at point 2
        cl.NormalComponent(0.0, normals=torch.tensor([[1.0, 1.0]]), points=[2], channels=(0, 1)),
    ]
    with pytest.raises(IncompatibleConstraintsError, match="point 2"):
        cl.wrap(Identity(), *cons)(u)
    cons = [
        cl.Dirichlet(1.0, points=torch.ones(5, dtype=torch.bool)),
        cl.Conservation.integral(0.0, weights=torch.ones(5)),
    ]
    with pytest.raises(IncompatibleConstraintsError):
        cl.wrap(Identity(), *cons)(u)


def test_debug_and_residual_on_points():
    w = torch.rand(8, dtype=F64)
    model = cl.wrap(Identity(), cl.Conservation.integral(1.0, weights=w), cl.Dirichlet(0.0, points=[1]),
                    debug=True)  # fmt: skip
    u = torch.randn(2, 8, 1, dtype=F64)
    y = model(u)
    r = model.residual(y)
    assert r.shape == (2, 2) and float(r.abs().max()) < 1e-12
    assert float(model.residual(u).abs().max()) > 1e-3  # the plain output violates
    assert "layout='points'" in repr(model)


def test_values_per_selected_point_follow_the_selection_order():
    u = torch.zeros(1, 4, 1, dtype=F64)
    idx = torch.tensor([2, 0, 3, 1])  # every point, in another order
    y = cl.wrap(
        Identity(), cl.Dirichlet(torch.tensor([[20.0], [0.0], [30.0], [10.0]]), points=idx)
    )(u)
    assert y[0, :, 0].tolist() == [0.0, 10.0, 20.0, 30.0]
    mask = torch.tensor([False, True, False, True])
    y = cl.wrap(Identity(), cl.Dirichlet(torch.tensor([[1.0], [3.0]]), points=mask))(u)
    assert y[0, :, 0].tolist() == [0.0, 1.0, 0.0, 3.0]


def test_noise_softens_the_integral_only():
    """noise= is the constraint noise of the integral rows; point values stay exact."""
    g = torch.Generator().manual_seed(8)
    B, P, C = 2, 10, 1
    u = torch.randn(B, P, C, generator=g, dtype=F64)
    var = torch.rand(B, P, C, generator=g, dtype=F64) + 0.2
    w = torch.rand(P, generator=g, dtype=F64)
    cons = [cl.Dirichlet(0.5, points=[2]), cl.Conservation.integral(1.0, weights=w)]
    mean, v = cl.wrap(Head(), *cons, noise=0.3, layout="points")((u, var))
    G, d = dense_rows(B, P, C, fixed=[(2, 0, 0.5)], integrals=[(w, 0, 1.0)])
    S = torch.diag_embed(var.reshape(B, -1))
    A = G @ S @ G.mT + torch.diag(torch.tensor([0.0, 0.09], dtype=F64))
    K = S @ G.mT @ torch.linalg.inv(A)
    ref = u.reshape(B, -1) - (
        K @ ((G @ u.reshape(B, -1, 1)).squeeze(-1) - d).unsqueeze(-1)
    ).squeeze(-1)
    ref_v = (S - K @ G @ S).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(mean.reshape(B, -1), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(v.reshape(B, -1), ref_v, rtol=0, atol=1e-12)
    assert bool((mean[:, 2] == 0.5).all()) and bool((v[:, 2] == 0).all())
    assert float(((mean[..., 0] * w).sum(-1) - 1.0).abs().min()) > 1e-6  # soft: not exact
    with pytest.raises(ValueError, match="no integral row"):
        cl.wrap(Head(), cl.Dirichlet(0.0, points=[1]), noise=0.1, layout="points")((u, var))


def test_a_normal_row_without_variance_at_rounding_counts_as_held():
    """Whether a normal row has freedom left is judged relative to the row's scale, not against
    an absolute zero: variance 1e-30 next to 1 is no freedom (a consistent row passes unchanged,
    an inconsistent one raises), while 1e-3 next to 1 is conditioned on."""
    u = torch.tensor([[[0.5, 2.0]]], dtype=F64)
    n = torch.tensor([[1.0, 1.0]], dtype=F64)
    cons = [cl.Dirichlet(2.0, points=[0], channels=1),
            cl.NormalComponent(2.5, normals=n, points=[0], channels=(0, 1))]  # fmt: skip
    model = cl.wrap(Head(), *cons, layout="points")
    tiny = torch.tensor([[[1e-30, 1.0]]], dtype=F64)
    mean, _ = model((u, tiny))  # consistent: u0 + 2 = 2.5 already
    assert torch.equal(mean, u)
    with pytest.raises(IncompatibleConstraintsError, match="point 0"):
        model((u + torch.tensor([0.1, 0.0], dtype=F64), tiny))
    small = torch.tensor([[[1e-3, 1.0]]], dtype=F64)
    mean, var = model((u + torch.tensor([0.1, 0.0], dtype=F64), small))
    assert abs(float((mean[0, 0] * n[0]).sum()) - 2.5) < 1e-12
    assert abs(float(var[0, 0, 0])) < 1e-15  # no variance left along the one free channel
