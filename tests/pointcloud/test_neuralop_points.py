"""neuraloperator's GINO and FNOGNO wrapped as point clouds (float32, as users run them)."""

from __future__ import annotations

import warnings

import pytest
import torch

import constraint_layers as cl
from constraint_layers.errors import GridError

neuralop = pytest.importorskip("neuralop")

F64 = torch.float64


def _quiet(fn, *a, **k):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


@pytest.fixture(scope="module")
def gino():
    from neuralop.models import GINO

    torch.manual_seed(0)
    model = _quiet(
        GINO,
        in_channels=1,
        out_channels=2,
        gno_coord_dim=2,
        in_gno_radius=0.3,
        out_gno_radius=0.3,
        fno_n_modes=(4, 4),
        fno_hidden_channels=8,
        fno_n_layers=1,
        projection_channel_ratio=1,
        fno_lifting_channel_ratio=1,
        gno_use_open3d=False,
    )
    g = torch.Generator().manual_seed(1)
    lat = torch.stack(
        torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij"), -1
    )
    call = dict(
        input_geom=torch.rand(1, 30, 2, generator=g),
        latent_queries=lat.unsqueeze(0),
        output_queries=torch.rand(1, 25, 2, generator=g),
        x=torch.randn(2, 30, 1, generator=g),
    )
    return model, call


def _base(model, call):
    with torch.no_grad():
        return _quiet(model, **call)


def test_grid_constraints_and_refine_refused(gino):
    model, _ = gino
    with pytest.raises(GridError, match="point cloud"):
        cl.wrap(model, cl.Dirichlet(0.0))
    with pytest.raises(GridError, match="weights"):
        cl.wrap(model, cl.Conservation.integral(0.0))
    with pytest.raises(GridError, match="no faces to refine"):
        cl.wrap(model, cl.Dirichlet(0.0, points=[0]), mode="refine")
    assert cl.wrap(model, cl.Dirichlet(0.0, points=[0])).layout == "points"


def test_dirichlet_points_exact_nothing_else_moves(gino):
    model, call = gino
    y0 = _base(model, call)
    sel = torch.tensor([0, 7, 11])
    wrapped = cl.wrap(model, cl.Dirichlet(0.0, points=sel))
    with torch.no_grad():
        y = _quiet(wrapped, **call)
    assert y.dtype == torch.float32 and y.shape == y0.shape
    assert bool((y[:, sel] == 0).all())
    rest = torch.ones(25, dtype=torch.bool)
    rest[sel] = False
    assert torch.equal(y[:, rest], y0[:, rest])


def test_normal_component_closed_form_and_integral(gino):
    model, call = gino
    y0 = _base(model, call).to(F64)
    g = torch.Generator().manual_seed(2)
    pts = torch.tensor([1, 2, 3, 4])
    n = torch.randn(4, 2, generator=g)
    wrapped = cl.wrap(model, cl.NormalComponent(0.0, normals=n, points=pts, channels=(0, 1)))
    with torch.no_grad():
        y = _quiet(wrapped, **call).to(F64)
    n64 = n.to(F64)
    x = y0[:, pts]
    ref = x - n64 * ((x * n64).sum(-1) / n64.square().sum(-1)).unsqueeze(-1)
    torch.testing.assert_close(y[:, pts], ref, rtol=0, atol=1e-5)
    w = torch.rand(25, generator=g) + 0.1
    wrapped = cl.wrap(model, cl.Conservation.integral(0.5, weights=w))
    with torch.no_grad():
        y = _quiet(wrapped, **call).to(F64)
    w64 = w.to(F64)
    r = (y0 * w64[:, None]).sum(1) - 0.5
    ref = y0 - w64[None, :, None] * (r / w64.square().sum()).unsqueeze(1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)


def test_all_three_jointly_equal_dense_projection(gino):
    model, call = gino
    y0 = _base(model, call).to(F64)
    g = torch.Generator().manual_seed(3)
    n = torch.randn(3, 2, generator=g)
    w = torch.rand(25, generator=g) + 0.1
    cons = [
        cl.Dirichlet(0.25, points=[0, 24]),
        cl.NormalComponent(0.1, normals=n, points=[5, 6, 7], channels=(0, 1)),
        cl.Conservation.integral(1.0, weights=w),
    ]
    with torch.no_grad():
        y = _quiet(cl.wrap(model, *cons), **call).to(F64)
    B, P, C = y0.shape
    rows, rhs = [], []
    for p in (0, 24):
        for c in range(C):
            r = torch.zeros(P * C, dtype=F64)
            r[p * C + c] = 1
            rows.append(r)
            rhs.append(0.25)
    for i, p in enumerate((5, 6, 7)):
        r = torch.zeros(P * C, dtype=F64)
        r[p * C : p * C + 2] = n[i].to(F64)
        rows.append(r)
        rhs.append(0.1)
    for c in range(C):
        r = torch.zeros(P * C, dtype=F64)
        r[c::C] = w.to(F64)
        rows.append(r)
        rhs.append(1.0)
    G, d = torch.stack(rows), torch.tensor(rhs, dtype=F64)
    x = y0.reshape(B, -1)
    ref = x - (torch.linalg.pinv(G @ G.T) @ (x @ G.T - d).T).T @ G
    torch.testing.assert_close(y.reshape(B, -1), ref, rtol=0, atol=1e-5)
    assert float((y.reshape(B, -1) @ G.T - d).abs().max()) < 1e-5


def test_per_sample_normals_through_given(gino):
    model, call = gino
    g = torch.Generator().manual_seed(4)
    normals = torch.randn(2, 4, 2, generator=g)  # (batch, K, d)
    c = cl.NormalComponent(0.0, normals=cl.Given("normals"), points=[3, 4, 5, 6], channels=(0, 1))
    wrapped = cl.wrap(model, c)
    with torch.no_grad():
        y = _quiet(wrapped, **call, normals=normals)
    assert float((y[:, 3:7] * normals).sum(-1).abs().max()) < 1e-5


def test_values_as_callables_of_the_call(gino):
    model, call = gino
    # the value at each selected point: its first query coordinate (channel 0 only)
    value = lambda c: c["output_queries"][0, :, :1]  # noqa: E731
    wrapped = cl.wrap(
        model, cl.Dirichlet(value, points=torch.ones(25, dtype=torch.bool), channels=0)
    )
    with torch.no_grad():
        y = _quiet(wrapped, **call)
    assert torch.equal(y[:, :, 0], call["output_queries"][0, :, 0].expand(2, 25))


def test_training_step_and_checkpoint(gino, tmp_path):
    model, call = gino
    w = torch.full((25,), 0.04)
    wrapped = cl.wrap(
        model, cl.Dirichlet(0.0, points=[0]), cl.Conservation.integral(0.0, weights=w)
    )
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    y = _quiet(wrapped, **call)
    loss = y.square().mean()
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in wrapped.parameters())
    opt.step()
    sd = wrapped.state_dict()
    assert all(k.startswith("model.") for k in sd)


def test_fnogno_unbatched_output():
    from neuralop.models import FNOGNO

    torch.manual_seed(0)
    model = _quiet(
        FNOGNO,
        in_channels=1,
        out_channels=2,
        fno_n_modes=(4, 4),
        fno_hidden_channels=8,
        fno_n_layers=1,
        gno_coord_dim=2,
        gno_radius=0.3,
        gno_use_open3d=False,
    )
    lat = torch.stack(
        torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 8), indexing="ij"), -1
    )
    out_p = torch.rand(20, 2, generator=torch.Generator().manual_seed(0))
    f = torch.randn(8, 8, 1)
    with torch.no_grad():
        y0 = _quiet(model, in_p=lat, out_p=out_p, f=f)
        y = _quiet(cl.wrap(model, cl.Dirichlet(1.0, points=[2, 3])), in_p=lat, out_p=out_p, f=f)
    assert y.shape == y0.shape == (20, 2)
    assert bool((y[[2, 3]] == 1.0).all())
    assert torch.equal(y[4:], y0[4:])
    with pytest.raises(GridError, match="point cloud"):
        cl.wrap(model, cl.Neumann(0.0))


def test_checkpoint_round_trip_keeps_point_constraints(gino, tmp_path):
    """save_checkpoint / from_checkpoint on a wrapped GINO: the point constraints come back as
    data (JSON record + weights_only tensors) and the reloaded wrapper gives the same output."""
    from constraint_layers.adapters.neuralop import from_checkpoint

    model, call = gino
    g = torch.Generator().manual_seed(6)
    cons = [
        cl.Dirichlet(0.5, points=[0, 3]),
        cl.NormalComponent(
            0.0, normals=torch.randn(3, 2, generator=g), points=[4, 5, 6], channels=(0, 1)
        ),
        cl.Conservation.integral(cl.Given("mass"), weights=torch.rand(25, generator=g)),
    ]
    wrapped = cl.wrap(model, *cons)
    wrapped.save_checkpoint(tmp_path, "gino")
    again = _quiet(from_checkpoint, tmp_path, "gino")
    assert again.layout == "points" and repr(again.constraints) == repr(wrapped.constraints)
    mass = torch.tensor([[[0.1, 0.2]], [[0.3, 0.4]]])  # (batch, R, channels)
    with torch.no_grad():
        a = _quiet(wrapped, **call, mass=mass)
        b = _quiet(again, **call, mass=mass)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
