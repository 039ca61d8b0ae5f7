"""Every bad input raises a clear exception naming what was expected and what was given."""

from __future__ import annotations

import math

import pytest
import torch

import constraint_layers as cl
from constraint_layers.errors import GridError, SingularConstraintError

F64 = torch.float64
condition_gaussian = cl.functional.condition_gaussian


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 10, dtype=F64, generator=g)
    var = torch.rand(3, 10, dtype=F64, generator=g) + 0.1
    G = torch.randn(2, 10, dtype=F64, generator=g)
    b = torch.randn(3, 2, dtype=F64, generator=g)
    return mu, var, G, b


CASES = [
    # (name, kwargs override, exception, words the message must hold)
    ("G columns", dict(G=torch.ones(2, 9, dtype=F64)), ValueError, ["(M, 10)", "(2, 9)"]),
    ("b rows", dict(b=torch.ones(3, 5, dtype=F64)), ValueError, ["(*batch, 2)", "(3, 5)"]),
    ("b type", dict(b="one"), TypeError, ["b must be", "str"]),
    ("G type", dict(G=[[1.0] * 10]), TypeError, ["G must be a tensor", "list"]),
    ("negative var", dict(var=-torch.ones(3, 10, dtype=F64)), ValueError, ["negative", "variance"]),
    (
        "NaN var",
        dict(var=torch.full((3, 10), math.nan, dtype=F64)),
        ValueError,
        ["NaN", "variance"],
    ),
    ("var shape", dict(var=torch.ones(3, 7, dtype=F64)), ValueError, ["(*batch, 10)", "(3, 7)"]),
    ("NaN mean", dict(mu=torch.full((3, 10), math.nan, dtype=F64)), ValueError, ["not finite"]),
    ("int mean", dict(mu=torch.ones(3, 10, dtype=torch.int64)), TypeError, ["floating-point"]),
    ("metric", dict(metric="mahalanobis"), ValueError, ["metric must be one of", "mahalanobis"]),
    ("noise negative", dict(noise=-1.0), ValueError, ["non-negative", "-1.0"]),
    ("noise NaN", dict(noise=math.nan), ValueError, ["non-negative"]),
    ("noise shape", dict(noise=torch.ones(5)), ValueError, ["one standard deviation per", "(5,)"]),
]


@pytest.mark.parametrize("name, over, exc, words", CASES, ids=[c[0] for c in CASES])
def test_conserve_bad_input(data, name, over, exc, words):
    mu, var, G, b = data
    args = {"mu": mu, "var": var, "G": G, "b": b, **over}
    kw = {k: v for k, v in over.items() if k in ("noise", "metric")}
    with pytest.raises(exc) as info:
        condition_gaussian(args["mu"], args["G"], args["b"], variance=args["var"], **kw)
    msg = str(info.value)
    assert msg.startswith("condition_gaussian:"), msg
    for w in words:
        assert w in msg, (w, msg)


def test_zero_variance_row_is_singular_not_nan(data):
    mu, var, G, b = data
    var = var.clone()
    G = G.clone()
    G[1, :5] = 0.0
    var[:, 5:] = 0.0  # row 1 reads only points with zero variance
    with pytest.raises(SingularConstraintError) as info:
        condition_gaussian(mu, G, b, variance=var)
    msg = str(info.value)
    assert "zero variance" in msg and "noise" in msg and 'metric="euclidean"' in msg
    assert "row 1" in msg
    ok = condition_gaussian(mu, G, b, variance=var, noise=1e-3)  # the fix the message names
    assert bool(torch.isfinite(ok.mean).all())
    ok = condition_gaussian(mu, G, b, variance=var, metric="euclidean")
    torch.testing.assert_close(ok.mean @ G.mT, b, rtol=0, atol=1e-12)
    with torch.enable_grad():  # the autograd path says the same
        with pytest.raises(SingularConstraintError, match="zero variance"):
            condition_gaussian(mu.requires_grad_(), G, b, variance=var)


def test_zero_row_and_dependent_rows(data):
    mu, var, G, b = data
    Z = G.clone()
    Z[0] = 0
    with pytest.raises(SingularConstraintError, match="row 0 of G is all zeros"):
        condition_gaussian(mu, Z, b, variance=var)
    D = torch.stack([G[0], 2 * G[0]])
    with pytest.raises(SingularConstraintError, match="linearly dependent"):
        condition_gaussian(mu, D, b, variance=var)


def test_bad_covariance(data):
    mu, _, G, b = data
    S = torch.eye(10, dtype=F64)
    S[0, 1] = 0.5
    with pytest.raises(ValueError, match="symmetric"):
        condition_gaussian(mu, G, b, covariance=S)
    S = -torch.eye(10, dtype=F64)
    with pytest.raises(ValueError, match="negative"):
        condition_gaussian(mu, G, b, covariance=S)
    S = torch.eye(10, dtype=F64)
    S[0, 1] = S[1, 0] = 3.0  # symmetric, unit diagonal, indefinite
    E = torch.zeros(2, 10, dtype=F64)
    E[0, 0], E[0, 1], E[1, 2] = 1.0, -1.0, 1.0  # row 0 reads the negative direction of S
    with pytest.raises((ValueError, SingularConstraintError), match="positive"):
        condition_gaussian(mu, E, b, covariance=S)
    with pytest.raises(ValueError, match=r"\(\*batch, 10, 10\)"):
        condition_gaussian(mu, G, b, covariance=torch.eye(9, dtype=F64))
    with pytest.raises(ValueError, match="once"):
        condition_gaussian(
            mu, G, b, covariance=torch.eye(10, dtype=F64), variance=torch.ones(10, dtype=F64)
        )


def test_no_nan_anywhere_on_degenerate_but_valid_input():
    mu = torch.zeros(1, 4, dtype=F64)
    var = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=F64)  # some zero variances: fine
    post = condition_gaussian(
        mu, torch.ones(1, 4, dtype=F64), torch.tensor([[2.0]], dtype=F64), variance=var
    )
    expected = torch.tensor([[0.0, 1.0, 0.0, 1.0]], dtype=F64)
    torch.testing.assert_close(post.mean, expected, rtol=0, atol=1e-15)
    assert bool(torch.isfinite(post.variance).all())


def test_conservation_spec_errors():
    with pytest.raises(TypeError, match="G must be a tensor"):
        cl.Conservation([1.0, 2.0])
    with pytest.raises(ValueError, match="NaN"):
        cl.Conservation(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="finite"):
        cl.Conservation(torch.ones(3), math.inf)
    with pytest.raises(TypeError, match="right-hand side"):
        cl.Conservation(torch.ones(3), "x")
    with pytest.raises(ValueError, match="rule must be one of"):
        cl.Conservation.integral(0.0, rule="gauss")
    with pytest.raises(ValueError, match="at most one of spacing=, extent= and grid="):
        cl.Conservation.integral(0.0, spacing=0.1, extent=1.0)
    with pytest.raises(GridError, match="strictly increasing"):
        cl.Conservation.integral(0.0, grid=torch.tensor([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError, match="one per integrated axis"):
        cl.Conservation.integral(0.0, dim=(0, 1), rule=("trapezoid",))
    c = cl.Conservation(torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"5 columns.*6 values"):
        c.rows((1, 6))
    c = cl.Conservation.integral(torch.ones(4))
    with pytest.raises(GridError, match=r"does not broadcast to the rows' shape \(2, 1, 3\)"):
        c.rows((2, 1, 8, 3))
    with pytest.raises(GridError, match="channel-first grid"):
        c.rows((2, 8))
    c = cl.Conservation.integral(0.0, grid=torch.linspace(0, 1, 7))
    with pytest.raises(GridError, match="7 nodes, but the output has 9"):
        c.rows((1, 1, 9))
    c = cl.Conservation.integral(0.0, dim=3)
    with pytest.raises(GridError, match="out of range"):
        c.rows((1, 1, 9))
    c = cl.Conservation.integral(0.0, channels=[2])
    with pytest.raises(GridError, match="channels"):
        c.rows((1, 2, 9))
    c = cl.Conservation.integral(lambda x: x.sum())
    with pytest.raises(ValueError, match="no input was given"):
        c.rows((1, 1, 9))


def test_layer_errors():
    net = torch.nn.Conv1d(1, 1, 3, padding=1)
    with pytest.raises(ValueError, match="metric must be one of"):
        cl.ConservationProjection(net, cl.Conservation.integral(0.0), metric="l1")
    with pytest.raises(TypeError, match="conservation constraints"):
        cl.ConservationProjection(net, [cl.Dirichlet(0.0)])
    with pytest.raises(ValueError, match="at least one"):
        cl.ConservationProjection(net, [])
    with pytest.raises(ValueError, match="non-negative"):
        cl.ConservationProjection(net, cl.Conservation.integral(0.0), noise=-1.0)
    model = cl.ConservationProjection(torch.nn.Linear(3, 12), cl.Conservation.integral(0.0),
                                      grid_shape=(5, 2))  # fmt: skip
    with pytest.raises(GridError, match="holds 10 points, but the output has 12"):
        model(torch.randn(2, 3))

    class Bad(torch.nn.Module):
        def forward(self, x):
            return (x, x, x)

    with pytest.raises(TypeError, match=r"\(mean, variance\)"):
        cl.wrap(Bad(), cl.Conservation.integral(0.0))(torch.randn(1, 1, 5))


def test_conservation_error_names_what_it_expects():
    with pytest.raises(TypeError, match="expected a cl.Conservation .* got float"):
        cl.metrics.conservation_error(torch.ones(1, 1, 5), 1.0)


def test_badly_conditioned_full_covariance_still_conserves_to_rounding():
    # a smooth GP prior on an 11 x 201 (t, x) grid: G Sigma G^T has condition ~1e9, yet its
    # Cholesky pivots stay healthy; the update must still satisfy G mean = b to rounding
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    x = torch.linspace(0, 1, 201, dtype=torch.float64)
    tt, xx = torch.meshgrid(t, x, indexing="ij")
    p = torch.stack([tt.flatten(), xx.flatten()], -1)
    scale = torch.tensor([0.3, 0.1], dtype=torch.float64)
    cov = torch.exp(-0.5 * ((p[:, None] - p[None]) / scale).square().sum(-1))
    con = cl.Conservation.integral(torch.zeros(11), dim=1, grid=x)
    G, b = con.dense((1, 1, 11, 201))
    mean = torch.randn(2211, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    post = cl.functional.condition_gaussian(mean, G, b[0], covariance=cov)
    assert torch.linalg.cond(G @ cov @ G.T) > 1e8
    assert (G @ post.mean - b[0]).abs().max() < 1e-14
