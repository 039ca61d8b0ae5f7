"""cl.Bounds through cl.wrap: alone and with conservation and boundary rows, deterministic and
Gaussian outputs, against a dense float64 QP reference (scipy's SLSQP) and the KKT conditions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import lsq_linear

import constraint_layers as cl
from constraint_layers._tolerance import tolerance
from constraint_layers.errors import ConstraintError

F64 = torch.float64


# --------------------------------------------------------------------------- tiny models
class Head(torch.nn.Module):
    """A Gaussian head on a grid: (mean, variance) from the input (a fixed, positive variance)."""

    def __init__(self, var: torch.Tensor) -> None:
        super().__init__()
        self.var = var

    def forward(self, x):
        return x * 1.0, self.var.expand_as(x)


class Dense(torch.nn.Module):
    """A flat Gaussian with a dense covariance (a torch MultivariateNormal)."""

    def __init__(self, cov: torch.Tensor) -> None:
        super().__init__()
        self.cov = cov

    def forward(self, x):
        return torch.distributions.MultivariateNormal(x, covariance_matrix=self.cov)


def qp_reference(u, C, d, lo, hi, W=None) -> np.ndarray:
    """min (x-u)^T W^-1 (x-u) s.t. C x = d, lo <= x <= hi, float64: scipy's bounded-variable
    least squares (an exact active-set method) with the rows weighted by 1e6 (their residual is
    then ~1e-12 of the move)."""
    u = np.asarray(u, dtype=np.float64)
    n = u.size
    Winv = np.eye(n) if W is None else np.linalg.inv(np.asarray(W, dtype=np.float64))
    R = np.linalg.cholesky(Winv).T  # ||R (x - u)||^2 = (x-u)^T W^-1 (x-u)
    C = np.asarray(C, dtype=np.float64).reshape(-1, n)
    d = np.asarray(d, dtype=np.float64).reshape(-1)
    A = np.vstack([R, 1e6 * C])
    rhs = np.concatenate([R @ u, 1e6 * d])
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), n)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), n)
    return lsq_linear(A, rhs, bounds=(lo, hi), method="bvls", tol=1e-15).x


def in_bounds(y, lo, hi) -> bool:
    return bool((y >= lo).all() and (y <= hi).all())


def per_frame_rows(con, shape) -> tuple[torch.Tensor, torch.Tensor]:
    r = con.rows(shape)
    return r.dense(int(np.prod(shape[1:]))), r.rhs


# ------------------------------------------------------------------------------ problems
def _problem(seed: int, batch: int = 2, x: int = 9, t: int = 3):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, 1, x, t, dtype=F64, generator=g)
    total = 0.2 + 0.4 * torch.rand(batch, 1, t, dtype=F64, generator=g)
    return u, cl.Conservation.integral(total, dim=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deterministic_conservation_matches_qp(seed):
    u, con = _problem(seed)
    u0 = u.clone()
    model = cl.wrap(torch.nn.Identity(), con, cl.Bounds(0.0, 0.6))
    y = model(u)
    assert torch.equal(u, u0)  # the caller's tensor untouched
    assert in_bounds(y, 0.0, 0.6)
    res = cl.metrics.conservation_error(y, con).abs().max()
    assert res <= tolerance(F64).residual
    G, b = per_frame_rows(con, u.shape)
    for s in range(u.shape[0]):
        ref = qp_reference(u[s].flatten(), G, b[s], 0.0, 0.6)
        np.testing.assert_allclose(y[s].flatten().numpy(), ref, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_general_rows_match_qp(seed):
    """Overlapping rows (a dense G): the general path."""
    g = torch.Generator().manual_seed(seed)
    n = 8
    G = torch.rand(2, n, dtype=F64, generator=g)
    u = torch.randn(3, n, dtype=F64, generator=g)
    b = torch.tensor([1.0, 1.5], dtype=F64)
    model = cl.wrap(torch.nn.Identity(), cl.Conservation(G, b), cl.Bounds(lower=0.0))
    y = model(u)
    assert bool((y >= 0).all())
    torch.testing.assert_close(y @ G.T, b.expand(3, 2), atol=1e-12, rtol=0)
    for s in range(3):
        ref = qp_reference(u[s], G, b, 0.0, np.inf)
        np.testing.assert_allclose(y[s].numpy(), ref, atol=1e-7)


def test_gaussian_diagonal_matches_qp_and_conditions_on_active_set():
    u, con = _problem(3)
    g = torch.Generator().manual_seed(7)
    var = 0.05 + torch.rand(u.shape, dtype=F64, generator=g)
    mean, v = cl.wrap(Head(var), con, cl.Bounds(0.0, 0.6, variance="active"))(u)
    assert in_bounds(mean, 0.0, 0.6)
    assert cl.metrics.conservation_error(mean, con).abs().max() <= tolerance(F64).residual
    G, b = per_frame_rows(con, u.shape)
    act = (mean == 0) | (mean == 0.6)
    assert bool(act.any()) and bool((v[act] == 0).all())
    for s in range(u.shape[0]):
        W = torch.diag(var[s].flatten())
        ref = qp_reference(u[s].flatten(), G, b[s], 0.0, 0.6, W)
        np.testing.assert_allclose(mean[s].flatten().numpy(), ref, atol=1e-7)
        # the variance: the Gaussian conditioned on the rows and the active bounds (dense formula)
        E = torch.eye(G.shape[1], dtype=F64)[act[s].flatten()]
        R = torch.cat([G, E])
        S = W - W @ R.T @ torch.linalg.pinv(R @ W @ R.T) @ R @ W
        torch.testing.assert_close(v[s].flatten(), S.diagonal().clamp_min(0), atol=1e-12, rtol=0)


def test_dense_covariance_matches_qp_and_samples_hold_rows():
    g = torch.Generator().manual_seed(4)
    n = 7
    A = torch.randn(n, n, dtype=F64, generator=g)
    cov = A @ A.T / n + 0.1 * torch.eye(n, dtype=F64)
    u = torch.randn(n, dtype=F64, generator=g) - 0.3
    con = cl.Conservation(torch.full((1, n), 1.0 / n, dtype=F64), torch.tensor([0.5], dtype=F64))
    out = cl.wrap(Dense(cov), con, cl.Bounds(lower=0.0, variance="active"))(u)
    mean = out.mean
    assert bool((mean >= 0).all())
    ref = qp_reference(u, con.G, con.b, 0.0, np.inf, cov)
    np.testing.assert_allclose(mean.numpy(), ref, atol=1e-7)
    draws = out.sample((64,))
    torch.testing.assert_close(draws.mean(-1), torch.full((64,), 0.5, dtype=F64), atol=1e-9, rtol=0)
    act = mean == 0
    assert bool(act.any())
    torch.testing.assert_close(draws[:, act], torch.zeros_like(draws[:, act]), atol=1e-9, rtol=0)


@pytest.mark.parametrize("head", ["diagonal", "dense"])
def test_default_variance_is_the_equality_only_posterior(head):
    """variance="rows": the bounded mean with the uncertainty of the rows alone."""
    g = torch.Generator().manual_seed(12)
    n = 7
    u = torch.randn(3, 1, n, dtype=F64, generator=g) - 0.2
    con = cl.Conservation.integral(0.4)
    if head == "diagonal":
        model = Head(0.1 + torch.rand(3, 1, n, dtype=F64, generator=g))
    else:
        A = torch.randn(n, n, dtype=F64, generator=g)
        model = Dense(A @ A.T / n + 0.1 * torch.eye(n, dtype=F64))
        u = u[:, 0]
    rows = cl.wrap(model, con, cl.Bounds(lower=0.0))(u)
    active = cl.wrap(model, con, cl.Bounds(lower=0.0, variance="active"))(u)
    plain = cl.wrap(model, con)(u)
    if head == "diagonal":
        torch.testing.assert_close(rows[0], active[0], atol=0, rtol=0)
        assert torch.equal(rows[1], plain[1]) and bool((rows[0] >= 0).all())
    else:
        torch.testing.assert_close(rows.mean, active.mean, atol=0, rtol=0)
        torch.testing.assert_close(rows.covariance_matrix, plain.covariance_matrix)
        draws = rows.sample((16,))
        torch.testing.assert_close(draws.sum(-1) * 0 + cl.metrics.conservation_error(
            draws.reshape(-1, 1, n), con).reshape(16, 3), torch.zeros(16, 3, dtype=F64),
            atol=1e-9, rtol=0)  # fmt: skip


def test_bounds_alone_is_the_clip():
    u = torch.randn(3, 2, 10)
    y = cl.wrap(torch.nn.Identity(), cl.Bounds(-0.5, 0.5))(u)
    assert torch.equal(y, u.clamp(-0.5, 0.5))
    bounds = cl.Bounds(lower=0.0, channels=[1], variance="active")
    mean, var = cl.wrap(Head(torch.ones(1)), bounds)(u)
    assert torch.equal(mean[:, 1], u[:, 1].clamp_min(0)) and torch.equal(mean[:, 0], u[:, 0])
    assert bool((var[:, 1][u[:, 1] < 0] == 0).all()) and bool((var[:, 0] == 1).all())


def test_dirichlet_conservation_bounds_deterministic_matches_qp():
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 1, 11, dtype=F64, generator=g)
    con = cl.Conservation.integral(0.3)
    model = cl.wrap(torch.nn.Identity(), cl.Dirichlet(0.0), con, cl.Bounds(0.0, 1.0))
    y = model(u)
    assert in_bounds(y, 0.0, 1.0) and bool((y[..., [0, -1]] == 0).all())
    assert cl.metrics.conservation_error(y, con).abs().max() <= tolerance(F64).residual
    G, b = per_frame_rows(con, u.shape)
    walls = torch.zeros(2, 11, dtype=F64)
    walls[0, 0] = walls[1, -1] = 1.0
    C = torch.cat([walls, G])
    for s in range(2):  # with Dirichlet walls: the Euclidean projection onto all rows
        ref = qp_reference(u[s].flatten(), C, torch.cat([torch.zeros(2, dtype=F64), b[s]]), 0, 1)
        np.testing.assert_allclose(y[s].flatten().numpy(), ref, atol=1e-7)


def test_dirichlet_conservation_bounds_gaussian_matches_qp():
    g = torch.Generator().manual_seed(6)
    u = torch.randn(2, 1, 11, dtype=F64, generator=g)
    var = 0.1 + torch.rand(2, 1, 11, dtype=F64, generator=g)
    con = cl.Conservation.integral(0.3)
    mean, v = cl.wrap(Head(var), cl.Dirichlet(0.0), con, cl.Bounds(lower=0.0))(u)
    assert bool((mean >= 0).all()) and bool((mean[..., [0, -1]] == 0).all())
    assert bool((v[..., [0, -1]].abs() <= 1e-12).all())  # the rows' posterior: 0 to rounding
    assert cl.metrics.conservation_error(mean, con).abs().max() <= tolerance(F64).residual
    G, b = per_frame_rows(con, u.shape)
    walls = torch.zeros(2, 11, dtype=F64)
    walls[0, 0] = walls[1, -1] = 1.0
    C = torch.cat([walls, G])
    for s in range(2):
        W = torch.diag(var[s].flatten())
        d = torch.cat([torch.zeros(2, dtype=F64), b[s]])
        ref = qp_reference(u[s].flatten(), C, d, 0.0, np.inf, W)
        np.testing.assert_allclose(mean[s].flatten().numpy(), ref, atol=1e-7)


def qp_moved_free(u, C, d, lo, hi, moved) -> np.ndarray:
    """The boundary step's problem in the full space (float64): min sum over the values the
    step leaves unchanged of (x - u)^2, the moved values free, s.t. C x = d (the boundary rows
    where each condition is in charge, then the conservation rows), lo <= x <= hi everywhere
    (scipy's bounded-variable least squares; rows weighted by 1e6)."""
    u = np.asarray(u, dtype=np.float64)
    keep = ~np.asarray(moved)
    R = np.eye(u.size)[keep]
    A = np.vstack([R, 1e6 * np.asarray(C, dtype=np.float64)])
    rhs = np.concatenate([R @ u, 1e6 * np.asarray(d, dtype=np.float64)])
    lo = np.broadcast_to(np.asarray(lo, dtype=np.float64), u.size)
    hi = np.broadcast_to(np.asarray(hi, dtype=np.float64), u.size)
    return lsq_linear(A, rhs, bounds=(lo, hi), method="bvls", tol=1e-15).x


def _step_rows(shape, bcs):
    """The boundary rows where each condition is in charge and the positions the step sets."""
    from constraint_layers._engine.faces import boundary_rows, plan
    from constraint_layers._grid import resolve_spacing

    hs = resolve_spacing(shape[2:])
    rows = boundary_rows(shape, bcs, spacing=hs, include_overridden=False)
    n = int(np.prod(shape[1:]))
    G = torch.cat([r.dense(n) for r in rows])
    b = torch.cat([r.rhs for r in rows], -1)
    moved = torch.zeros(n, dtype=torch.bool)
    for c in plan(shape, bcs, hs, 0, True, "test").conds:
        moved[c.moves.reshape(-1)] = True
        moved[c.index.gather(1, c.pivot.unsqueeze(1)).reshape(-1)] = True
    return G, b, moved


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_mass", [False, True])
def test_neumann_pivot_outside_bounds_is_held_at_the_bound(seed, with_mass):
    """A Neumann stencil sets the wall value from the interior (u_0 = (4 u_1 - u_2) / 3 for
    order 2), which can leave the bounds; those values join the projection as inequalities:
    the result is the QP solution with the walls' values free but bounded, exactly."""
    g = torch.Generator().manual_seed(seed)
    shape = (3, 1, 13)
    u = torch.rand(shape, dtype=F64, generator=g)
    u[:, :, 1] = 0.02 * torch.rand(3, 1, dtype=F64, generator=g)  # next to the wall: near 0
    u[:, :, 2] = 0.8 + torch.rand(3, 1, dtype=F64, generator=g)  # the pivot goes negative
    u[:, :, -2] = 0.01
    bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(0.5, side="high")]
    con = [cl.Conservation.integral(0.4)] if with_mass else []
    model = cl.wrap(torch.nn.Identity(), *bcs, *con, cl.Bounds(0.0, 1.2), debug=True)
    y = model(u)
    assert in_bounds(y, 0.0, 1.2)
    assert bool((y[:, 0, 0] == 0).all())  # held at the bound (it was below)
    G, b, moved = _step_rows(shape, bcs)
    if with_mass:
        Gc, bc = per_frame_rows(con[0], shape)
        G, b = torch.cat([G, Gc]), torch.cat([b.expand(3, -1), bc], -1)
    b = b.expand(3, -1)
    for s in range(3):
        ref = qp_moved_free(u[s].flatten(), G, b[s], 0.0, 1.2, moved)
        np.testing.assert_allclose(y[s].flatten().numpy(), ref, atol=1e-7)
        res = G @ y[s].flatten() - b[s]
        assert float(res.abs().max()) < 1e-12


def test_neumann_pivot_bounds_2d_and_gradients():
    """2D: Dirichlet on x, Neumann on y, bounds: the QP solution; differentiable (gradcheck,
    away from kinks) through the active set over the walls."""
    g = torch.Generator().manual_seed(9)
    shape = (1, 1, 6, 7)
    u = 0.5 + 0.3 * torch.rand(shape, dtype=F64, generator=g)
    u[..., 1] = 0.01
    u[..., 2] = 1.0  # the low-y Neumann pivot (4 u_1 - u_2) / 3 < 0 along the face
    bcs = [cl.Dirichlet(0.5, dim=0), cl.Neumann(0.0, dim=1, side="low")]
    model = cl.wrap(torch.nn.Identity(), *bcs, cl.Bounds(lower=0.0), debug=True)
    y = model(u)
    G, b, moved = _step_rows(shape, bcs)
    ref = qp_moved_free(u.flatten(), G, b[0], 0.0, np.inf, moved)
    np.testing.assert_allclose(y.flatten().numpy(), ref, atol=1e-7)
    x = u.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: model(t), (x,), eps=1e-7, atol=1e-6)


def test_dirichlet_wall_outside_bounds_raises():
    """A Dirichlet value outside the bounds: no other value changes it, so it raises."""
    u = torch.rand(1, 1, 11, dtype=F64)
    model = cl.wrap(torch.nn.Identity(), cl.Dirichlet(-0.5), cl.Bounds(lower=0.0))
    with pytest.raises(ConstraintError, match="no choice of the other values changes it"):
        model(u)


@pytest.mark.parametrize("kind", ["deterministic", "gaussian", "dirichlet"])
def test_inactive_bounds_give_the_equality_only_result(kind):
    u, con = _problem(8)
    loose = cl.Bounds(-100.0, 100.0)
    if kind == "deterministic":
        a, b = cl.wrap(torch.nn.Identity(), con, loose)(u), cl.wrap(torch.nn.Identity(), con)(u)
        assert torch.equal(a, b)
        return
    var = torch.full(u.shape, 0.3, dtype=F64)
    if kind == "gaussian":
        a = cl.wrap(Head(var), con, loose)(u)
        b = cl.wrap(Head(var), con)(u)
    else:
        bc = cl.Dirichlet(0.0, dim=0)
        a = cl.wrap(Head(var), bc, con, loose)(u)
        b = cl.wrap(Head(var), bc, con)(u)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_infeasible_total_raises_naming_rows():
    u = torch.rand(1, 1, 9, 2, dtype=F64)
    con = cl.Conservation.integral(torch.tensor([0.3, 2.0], dtype=F64), dim=0)
    with pytest.raises(ConstraintError, match=r"row \(0, 0, 1\).*requested total 2"):
        cl.wrap(torch.nn.Identity(), con, cl.Bounds(0.0, 1.0))(u)


def test_given_bounds():
    u, con = _problem(9)
    model = cl.wrap(torch.nn.Identity(), con, cl.Bounds(cl.Given("floor"), cl.Given("ceiling")))
    lo = torch.zeros(9, 1, dtype=F64)  # broadcast over (batch, channels, x, t)
    y = model(u, floor=lo, ceiling=0.7)
    assert in_bounds(y, 0.0, 0.7)
    ref = cl.wrap(torch.nn.Identity(), con, cl.Bounds(0.0, 0.7))(u)
    torch.testing.assert_close(y, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="floor"):
        model(u, ceiling=0.7)


def test_float32_bounds_exact_and_rows_to_tolerance():
    u, con = _problem(10)
    y = cl.wrap(torch.nn.Identity(), con, cl.Bounds(0.0, 0.6))(u.float())
    assert y.dtype == torch.float32 and in_bounds(y, 0.0, 0.6)
    rel = cl.metrics.conservation_error(y, con).abs().max() / (y.abs().max() + 1)
    assert rel <= tolerance(torch.float32).residual


@pytest.mark.parametrize("path", ["separable", "general"])
def test_gradcheck_away_from_kinks(path):
    g = torch.Generator().manual_seed(11)
    if path == "separable":
        u, con = _problem(11, batch=1, x=7, t=2)
    else:
        G = torch.rand(2, 6, dtype=F64, generator=g)
        u = torch.randn(1, 6, dtype=F64, generator=g)
        con = cl.Conservation(G, torch.tensor([1.0, 1.2], dtype=F64))
    model = cl.wrap(torch.nn.Identity(), con, cl.Bounds(lower=0.0))
    y = model(u)
    assert bool((y == 0).any())  # some bound active
    gap = (y[y > 0].min(), (u - y).abs().max())
    assert gap[0] > 1e-3
    x = u.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: model(t), (x,), eps=1e-7, atol=1e-6)


def test_bad_bounds():
    with pytest.raises(ValueError, match="neither"):
        cl.Bounds()
    with pytest.raises(ValueError, match="lower must not exceed upper"):
        cl.Bounds(1.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        cl.Bounds(lower=torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="lower must be"):
        cl.Bounds(lower="zero")
    model = cl.wrap(torch.nn.Identity(), cl.Bounds(lower=torch.zeros(3)))
    with pytest.raises(cl.errors.GridError, match="does not broadcast"):
        model(torch.randn(2, 1, 5))


def test_debug_checks_the_bounds(monkeypatch):
    """debug=True checks every value against the bounds, exactly: a projection that leaves a
    value outside (simulated) raises and names it; the correct projection passes."""
    from constraint_layers._engine.bounded import joint as _project_bounds
    from constraint_layers.errors import ConstraintViolationError

    u, mass = _problem(0)
    model = cl.wrap(torch.nn.Identity(), mass, cl.Bounds(lower=0.0, upper=2.0), debug=True)
    y = model(u)  # the real projection: within the bounds
    assert in_bounds(y, 0.0, 2.0)
    real = _project_bounds.project_with_bounds

    def leaky(pred, *args, **kwargs):
        out = real(pred, *args, **kwargs)
        mean = out.mean.clone(memory_format=torch.contiguous_format)
        flat = mean.view(-1)
        flat[int((flat == 0).nonzero()[0])] = -1e-30  # an active bound, just below (rows hold)
        return out._replace(mean=mean)

    monkeypatch.setattr(_project_bounds, "project_with_bounds", leaky)  # the engine's import
    with pytest.raises(ConstraintViolationError, match=r"outside its lower bound 0\.0"):
        model(u)
    plain = cl.wrap(torch.nn.Identity(), mass, cl.Bounds(lower=0.0, upper=2.0))
    assert float(plain(u).min()) == -1e-30  # without debug: not checked
