"""The boundary output step: exactness, the dense reference, values, corners, lift, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import constraint_layers as cl
from constraint_layers.errors import GridError
from constraint_layers.functional import boundary_rows, enforce_boundary
from constraint_layers.testing import RESIDUAL_TOL, reference_enforce, relative_residual

DTYPES = [torch.float32, torch.float64]

# One flat table of cases: (id, output shape, conditions, grid options).
CASES = [
    ("dirichlet-1d", (3, 2, 17), [cl.Dirichlet(0.3)], {}),
    ("dirichlet-low-high", (2, 1, 9), [cl.Dirichlet(1.0, side="low"), cl.Dirichlet(-2.0, side="high")], {}),
    ("neumann-heat", (4, 1, 50), [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")], {}),
    ("neumann-order1", (2, 3, 12), [cl.Neumann(1.5, order=1)], {}),
    ("neumann-order3-extent", (2, 1, 40), [cl.Neumann(-0.7, order=3)], {"extent": 2 * math.pi}),
    ("neumann-spacing", (2, 1, 20), [cl.Neumann(0.2, side="high", order=3)], {"spacing": 0.05}),
    ("periodic-1d", (3, 2, 8), [cl.Periodic()], {}),
    ("x-t-stokes", (2, 1, 30, 6), [cl.Dirichlet(torch.linspace(0, 1, 6), dim=0, side="low")], {}),
    ("2d-mixed", (2, 2, 11, 13), [cl.Dirichlet(1.0, dim=0), cl.Neumann(0.5, dim=1, order=3)], {}),
    ("2d-channels", (2, 3, 9, 10), [cl.Neumann(0.0, dim=1, channels=[0, 2]), cl.Periodic(dim=0, channels=1)], {}),
    ("cavity-4-walls", (2, 1, 10, 10, 4), [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(1.0, dim=1)], {}),
    ("3d-neumann-periodic", (1, 2, 7, 8, 9), [cl.Periodic(dim=2), cl.Neumann(1.0, dim=0, order=2), cl.Dirichlet(-1.0, dim=-2, side="high")], {"extent": (1.0, 2.0, 3.0)}),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("shape", "bcs", "grid"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_exact_and_equal_to_dense_projection(shape, bcs, grid, dtype):
    torch.manual_seed(0)
    y = torch.randn(shape, dtype=dtype)
    before = y.clone()
    z = enforce_boundary(y, bcs, **grid)
    assert torch.equal(y, before), "the caller's tensor was modified"
    assert z.dtype == dtype and z.shape == y.shape
    assert relative_residual(y, bcs, **grid) > 1e-3, "vacuous: the random output already satisfies"
    assert relative_residual(z, bcs, **grid) <= RESIDUAL_TOL[dtype]
    ref = reference_enforce(y, bcs, **grid)
    assert torch.allclose(
        z.double(), ref, rtol=0, atol=50 * torch.finfo(dtype).eps * (1 + float(ref.abs().max()))
    )
    again = enforce_boundary(z, bcs, **grid)
    assert torch.allclose(
        again, z, rtol=0, atol=50 * torch.finfo(dtype).eps * (1 + float(z.abs().max()))
    )


@st.composite
def _problem(draw):
    n = draw(st.integers(1, 3))
    sizes = [draw(st.integers(6, 10)) for _ in range(n)]
    channels = draw(st.integers(1, 3))
    bcs, claimed = [], set()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["dirichlet", "neumann", "periodic"]))
        dim = draw(st.integers(-n, n - 1))
        chans = draw(
            st.one_of(
                st.none(),
                st.lists(st.integers(0, channels - 1), min_size=1, max_size=channels, unique=True),
            )
        )
        value = draw(st.floats(-10, 10, allow_nan=False))
        side = draw(st.sampled_from(["low", "high", "both"]))
        if kind == "dirichlet":
            bcs.append(cl.Dirichlet(value, dim=dim, side=side, channels=chans))
        elif kind == "neumann":
            bcs.append(
                cl.Neumann(value, dim=dim, side=side, channels=chans, order=draw(st.integers(1, 3)))
            )
        else:
            bcs.append(cl.Periodic(dim=dim, channels=chans))
        faces = {(dim % n, s) for s in bcs[-1].sides}
        if faces & claimed:  # one condition per face (the overlap is a clear error, tested below)
            bcs.pop()
        claimed |= faces
    extent = [draw(st.floats(0.1, 10.0)) for _ in range(n)]
    return (draw(st.integers(1, 3)), channels, *sizes), bcs, extent, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=60, deadline=None)
@given(_problem())
def test_property_random_conditions_match_reference(problem):
    shape, bcs, extent, seed = problem
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(shape, dtype=torch.float64, generator=gen) * 3
    z = enforce_boundary(y, bcs, extent=extent)
    assert relative_residual(z, bcs, extent=extent) <= RESIDUAL_TOL[torch.float64]
    ref = reference_enforce(y, bcs, extent=extent)
    assert torch.allclose(z, ref, rtol=0, atol=1e-12 * (1 + float(ref.abs().max())))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dirichlet_and_periodic_are_bit_exact(dtype):
    y = torch.randn(5, 2, 33, 7, dtype=dtype)
    g = torch.randn(5, 2, 7, dtype=torch.float64)  # per sample, channel and frame; cast to dtype
    z = enforce_boundary(y, [cl.Dirichlet(g, dim=0, side="low"), cl.Periodic(dim=1)])
    assert torch.equal(z[:, :, 0, 1:-1], g.to(dtype)[..., 1:-1])
    assert torch.equal(z[..., 0], z[..., -1])


def test_neumann_uses_the_outward_normal():
    x = torch.linspace(0, 1, 201, dtype=torch.float64)
    y = (x**2).expand(1, 1, -1).clone()  # du/dx = 2x: outward flux 0 at x=0, +2 at x=1
    z = enforce_boundary(y, [cl.Neumann(-3.0, side="low", order=2)])
    h = 1 / 200
    dudx_low = (-1.5 * z[..., 0] + 2 * z[..., 1] - 0.5 * z[..., 2]) / h
    assert torch.allclose(dudx_low, torch.tensor(3.0, dtype=torch.float64), atol=1e-10)
    # the exact solution already satisfies its own outward fluxes up to the stencil error
    err = cl.metrics.boundary_error(y, [cl.Neumann(0.0, side="low"), cl.Neumann(2.0, side="high")])
    assert float(err.max()) < 1e-10  # x^2 is integrated exactly by the 2nd-order stencil


def test_neumann_cross_checked_with_neuralop_finite_diff():
    fd = pytest.importorskip("neuralop.losses.differentiation")
    torch.manual_seed(1)
    y = torch.randn(3, 1, 64, 48, dtype=torch.float64)
    q = torch.randn(3, 1, 48, dtype=torch.float64)  # high-side flux per sample and frame
    z = enforce_boundary(
        y, [cl.Neumann(q, dim=0, side="high", order=3), cl.Neumann(0.0, dim=0, side="low", order=3)]
    )
    diff = fd.FiniteDiff(dim=2, h=(1 / 63, 1 / 47), periodic_in_x=False, periodic_in_y=False)
    dudx = diff.dx(z[:, 0])  # (batch, nx, ny): one-sided 3rd-order stencils at x boundaries
    assert torch.allclose(dudx[:, -1, :], q[:, 0], atol=1e-9)
    assert torch.allclose(dudx[:, 0, :], torch.zeros_like(q[:, 0]), atol=1e-9)


def test_resolution_change_stays_exact():
    bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]
    for n in (17, 64, 500):
        z = enforce_boundary(torch.randn(2, 1, n, dtype=torch.float64), bcs, extent=1.0)
        assert relative_residual(z, bcs) <= 1e-12


def test_channel_selection_leaves_other_channels_untouched():
    y = torch.randn(2, 4, 12, 9)
    z = enforce_boundary(y, [cl.Dirichlet(7.0, dim=1, channels=[1, 3])])
    assert torch.equal(z[:, [0, 2]], y[:, [0, 2]])
    assert (z[:, [1, 3]][..., 0] == 7).all() and (z[:, [1, 3]][..., -1] == 7).all()


def test_corner_priority_later_condition_wins():
    y = torch.randn(1, 1, 6, 6)
    z = enforce_boundary(y, [cl.Dirichlet(1.0, dim=0), cl.Dirichlet(2.0, dim=1)])
    assert (z[0, 0, [0, -1]][:, [0, -1]] == 2).all()
    assert (z[0, 0, 0, 1:-1] == 1).all()
    z = enforce_boundary(y, [cl.Dirichlet(2.0, dim=1), cl.Dirichlet(1.0, dim=0)])
    assert (z[0, 0, [0, -1]][:, [0, -1]] == 1).all()


def test_callable_values_receive_the_input():
    x = torch.randn(3, 2, 20)
    bc = cl.Dirichlet(lambda inp: inp[:, :1, 0], side="low")  # per-sample value read off the input
    z = enforce_boundary(torch.randn(3, 1, 20), [bc], inputs=x)
    assert torch.equal(z[:, :, 0], x[:, :1, 0])
    with pytest.raises(ValueError, match="callable of the model input"):
        enforce_boundary(torch.randn(3, 1, 20), [bc])


def test_gradcheck_through_values_and_output():
    y = torch.randn(2, 1, 9, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(2, 1, 4, dtype=torch.float64, requires_grad=True)

    def f(y, g, q):
        bcs = [
            cl.Dirichlet(g, dim=0, side="low"),
            cl.Neumann(q, dim=0, side="high", order=3),
            cl.Periodic(dim=1),
        ]
        return enforce_boundary(y, bcs, lift=0)

    assert torch.autograd.gradcheck(f, (y, g, q))

    def f_lift(y, g, q):
        bcs = [cl.Dirichlet(g, dim=0, side="low"), cl.Neumann(q, dim=0, side="high", order=2)]
        return enforce_boundary(y, bcs, lift=2)

    assert torch.autograd.gradcheck(f_lift, (y, g, q))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bcs",
    [
        [cl.Dirichlet(1.0)],
        [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high", order=3)],
        [cl.Periodic()],
        [
            cl.Dirichlet(0.5, dim=0),
            cl.Neumann(1.0, dim=1, side="low", order=3),
            cl.Dirichlet(-0.2, dim=1, side="high"),
        ],
    ],
    ids=["dirichlet", "neumann", "periodic", "2d-mixed"],
)
def test_lift_is_exact_and_smooth(bcs, dtype):
    n = 64
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    ndim = 1 + max(bc.dim for bc in bcs)
    base = torch.sin(3 * x) + 0.3
    y = base if ndim == 1 else base[:, None] * torch.cos(2 * x)[None, :]
    y = y.expand(2, 1, *y.shape).to(dtype)
    z0 = enforce_boundary(y, bcs)
    z8 = enforce_boundary(y, bcs, lift=8)
    assert relative_residual(z8, bcs) <= RESIDUAL_TOL[dtype]
    # no kink: relative to its size, the lifted correction bends far less than a one-node move

    def kink(z):
        corr = (z - y).double()
        if ndim == 2:  # away from the corners, where faces meet and nodes are shared
            corr = corr[..., 10:-10]
        return float(corr.diff(n=2, dim=2).abs().amax() / corr.abs().amax())

    assert kink(z0) >= 0.9
    assert kink(z8) < 0.35


def test_boundary_rows_state_the_stencils():
    rows = boundary_rows((1, 1, 10), [cl.Neumann(2.0, side="high", order=3)])[0]
    c = rows.dense(10)
    h = 1 / 9
    assert torch.allclose(
        c[0, -4:], torch.tensor([-1 / 3, 1.5, -3, 11 / 6], dtype=torch.float64) / h
    )
    assert rows.rhs.tolist() == [[2.0]] and rows.moves.tolist() == [[9]]
    per = boundary_rows((2, 1, 5, 3), [cl.Periodic(dim=0)])[0]
    assert per.index.shape == (3, 2) and per.rhs.shape == (2, 3)


def test_boundary_error_metric():
    y = torch.zeros(2, 1, 11)
    err = cl.metrics.boundary_error(y, [cl.Dirichlet(1.0), cl.Neumann(0.5), cl.Periodic()])
    assert err.tolist() == [1.0, 0.5, 0.0]


# ----------------------------------------------------------------------------------- bad input
BAD = [
    ("not a tensor", lambda: enforce_boundary([1.0, 2.0], [cl.Dirichlet()]), TypeError, "torch.Tensor"),
    ("no spatial axis", lambda: enforce_boundary(torch.randn(2, 3), [cl.Dirichlet()]), GridError, r"\(2, 3\)"),
    ("integer output", lambda: enforce_boundary(torch.ones(1, 1, 5, dtype=torch.long), [cl.Dirichlet()]), TypeError, "floating"),
    ("dim out of range", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet(dim=1)]), GridError, "dim=1 is out of range"),
    ("grid too short", lambda: enforce_boundary(torch.randn(1, 1, 4), [cl.Neumann(order=3)]), GridError, "at least 5 nodes"),
    ("grid too short for lift", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet()], lift=8), GridError, "lift=8"),
    ("value shape", lambda: enforce_boundary(torch.randn(2, 1, 8, 5), [cl.Dirichlet(torch.ones(4), dim=0)]), GridError, r"does not broadcast to the face shape \(2, 1, 5\)"),
    ("dim missing on 2 axes", lambda: enforce_boundary(torch.randn(2, 1, 8, 5), [cl.Neumann(0.0)]), GridError, r"without dim=, but the output has 2 spatial axes"),
    ("nan value", lambda: cl.Dirichlet(float("nan")), ValueError, "finite"),
    ("inf tensor", lambda: cl.Neumann(torch.tensor([1.0, float("inf")])), ValueError, "NaN or inf"),
    ("nan from callable", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet(lambda x: torch.tensor(float("nan")))], inputs=1), ValueError, "NaN or inf"),
    ("bad side", lambda: cl.Dirichlet(side="left"), ValueError, "side must be one of"),
    ("bad order", lambda: cl.Neumann(order=4), ValueError, "order must be one of"),
    ("bad channels", lambda: enforce_boundary(torch.randn(1, 2, 8), [cl.Dirichlet(channels=[2])]), GridError, "channels=\\[2\\] out of range"),
    ("duplicate channels", lambda: cl.Dirichlet(channels=[0, 0]), ValueError, "duplicates"),
    ("negative lift", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet()], lift=-1), ValueError, "non-negative"),
    ("not a condition", lambda: enforce_boundary(torch.randn(1, 1, 8), [0.0]), TypeError, "boundary conditions"),
    ("spacing and extent", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet()], spacing=0.1, extent=1.0), ValueError, "not both"),
    ("negative spacing", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Dirichlet()], spacing=-0.1), GridError, "positive"),
    ("periodic without endpoint", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Periodic()], endpoint=False), GridError, "endpoint=False"),
    ("two conditions on one face", lambda: enforce_boundary(torch.randn(1, 1, 8), [cl.Periodic(), cl.Dirichlet(side="low")]), ValueError, "both act on the low face"),
    ("value type", lambda: cl.Dirichlet("1.0"), TypeError, "value must be a number"),
    ("dim type", lambda: cl.Dirichlet(dim=0.0), TypeError, "dim must be an int"),
]  # fmt: skip


@pytest.mark.parametrize(("make", "exc", "match"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_raises_clear_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_endpoint_false_allows_the_low_side():
    y = torch.randn(1, 1, 16)
    z = enforce_boundary(y, [cl.Neumann(1.0, side="low")], endpoint=False)
    h = 1 / 16
    assert torch.allclose(
        (1.5 * z[..., 0] - 2 * z[..., 1] + 0.5 * z[..., 2]) / h, torch.tensor(1.0), atol=1e-4
    )


@settings(max_examples=40, deadline=None)
@given(_problem(), st.integers(1, 3))
def test_property_lift_is_exact_and_idempotent(problem, lift):
    shape, bcs, extent, seed = problem
    shape = (*shape[:2], *(s + 2 * lift for s in shape[2:]))  # room for the lift
    y = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    z = enforce_boundary(y, bcs, extent=extent, lift=lift)
    assert relative_residual(z, bcs, extent=extent) <= RESIDUAL_TOL[torch.float64]
    again = enforce_boundary(z, bcs, extent=extent, lift=lift)
    assert torch.allclose(again, z, rtol=0, atol=1e-12 * (1 + float(z.abs().max())))


def test_axis_of_one_node_is_fine_when_no_condition_acts_on_it():
    y = torch.randn(2, 1, 16, 1)  # a single time frame
    bcs = [cl.Neumann(0.0, dim=0)]
    z = enforce_boundary(y, bcs)
    assert float(cl.metrics.boundary_error(z, bcs).max()) < 1e-4
    with pytest.raises(GridError, match="at least 4 nodes"):
        enforce_boundary(y, [cl.Neumann(0.0, dim=1)])
