"""The engine's dispatcher: the structure tags of constraints and rows, and the solver it picks
for each mix (lineax's AutoLinearSolver pattern), checked directly; and that the solver it names
is the one that runs."""

from __future__ import annotations

import pytest
import torch

import constraint_layers as cl
from constraint_layers._engine import dispatch
from constraint_layers._engine.dispatch import SOLVERS, choose, tags_of
from constraint_layers._engine.tags import TAGS, structure_of

F64 = torch.float64
Gaussian = cl.functional.Gaussian

WALL = cl.Dirichlet(0.0)
NEUMANN = cl.Neumann(0.0)
PERIODIC = cl.Periodic()
TOTAL = cl.Conservation.integral(1.0)  # one row per frame
DENSE = cl.Conservation(torch.ones(2, 9, dtype=F64), torch.tensor([1.0, 1.0], dtype=F64))
BOX = cl.Bounds(lower=-1.0)
DIV = cl.DivergenceFree()
POINT = cl.Dirichlet(0.0, points=torch.tensor([0, 2]))


def test_every_constraint_carries_its_tag():
    assert [structure_of(c) for c in (WALL, NEUMANN, PERIODIC)] == ["face"] * 3
    assert structure_of(TOTAL) == "frame"
    assert structure_of(DENSE) == "dense"
    assert structure_of(BOX) == "bounded"
    assert structure_of(DIV) == "local"
    assert structure_of(POINT) == "points"
    assert set(TAGS) == {"face", "frame", "dense", "local", "bounded"}
    with pytest.raises(TypeError, match="structure tag"):
        structure_of(object())


def test_rows_carry_their_tag():
    shape = (2, 1, 9, 4)
    assert cl.Dirichlet(0.0, dim=0).rows(shape).structure == "face"  # a face-local mobility
    assert TOTAL.rows(shape).structure == "frame"  # disjoint rows, one per frame
    assert DENSE.rows((2, 1, 9)).structure == "dense"  # rows sharing positions
    assert cl.Conservation.integral(0.0, dim=(0, 1)).rows(shape).structure == "frame"
    assert DIV.rows((1, 2, 8, 8)).structure == "local"


DET = Gaussian(torch.zeros(2, 1, 9, dtype=F64), event_ndim=2)
VAR = Gaussian(torch.zeros(2, 1, 9, dtype=F64), torch.ones(2, 1, 9, dtype=F64), event_ndim=2)
COV = Gaussian(torch.zeros(2, 9, dtype=F64), None, torch.eye(9, dtype=F64), event_ndim=1)

CASES = [
    # (constraints, prediction, layout, solver)
    ([WALL], DET, "grid", "faces"),
    ([WALL, NEUMANN], DET, "grid", "faces"),
    ([NEUMANN, TOTAL], DET, "grid", "faces+dense"),
    ([WALL, DENSE], DET, "grid", "faces+dense"),
    ([WALL, TOTAL], VAR, "grid", "joint-gaussian"),
    ([PERIODIC], VAR, "grid", "joint-gaussian"),
    ([TOTAL], DET, "grid", "streaming"),
    ([TOTAL], VAR, "grid", "streaming"),
    ([TOTAL], COV, "grid", "dense"),  # a full covariance couples the frames
    ([TOTAL, TOTAL], VAR, "grid", "dense"),  # two constraints: stacked
    ([DENSE], VAR, "grid", "dense"),
    ([BOX], DET, "grid", "bounded"),
    ([NEUMANN, TOTAL, BOX], DET, "grid", "bounded"),  # bounds on top of the rows
    ([TOTAL, BOX], VAR, "grid", "bounded"),
    ([DIV], DET, "grid", "local"),
    ([DIV, WALL, TOTAL], DET, "grid", "local"),  # the local solver composes the others
    ([DIV, BOX], VAR, "grid", "local"),
    ([POINT], DET, "points", "points"),
    ([TOTAL], DET, "points", "points"),  # the layout decides
]


@pytest.mark.parametrize("constraints, pred, layout, solver", CASES)
def test_the_dispatcher_picks_the_solver_by_the_tags(constraints, pred, layout, solver):
    assert choose(constraints, pred, layout=layout) == solver
    assert solver in SOLVERS


def test_tags_follow_the_constraints_order():
    assert tags_of([NEUMANN, TOTAL, BOX, DIV]) == ("face", "frame", "bounded", "local")


@pytest.mark.parametrize(
    "constraints, solver",
    [
        ([cl.Neumann(0.0)], "faces"),
        ([cl.Neumann(0.0), cl.Conservation.integral(0.3)], "faces+dense"),
        ([cl.Conservation.integral(0.3)], "streaming"),
        ([cl.Conservation.integral(0.3), cl.Bounds(lower=-0.5)], "bounded"),
    ],
)
def test_the_named_solver_runs(monkeypatch, constraints, solver):
    """``project`` runs the solver ``choose`` names (and only it), and its result holds."""
    ran = []
    for name, fn in dispatch._RUN.items():

        def spy(pred, cons, opts, _fn=fn, _name=name):
            ran.append(_name)
            return _fn(pred, cons, opts)

        monkeypatch.setitem(dispatch._RUN, name, spy)
    u = torch.randn(3, 1, 17, dtype=F64, generator=torch.Generator().manual_seed(0))
    out = dispatch.project(Gaussian(u, event_ndim=2), constraints).mean
    assert ran[0] == solver
    if solver == "bounded":  # the equality rows went through the dispatcher first
        assert ran[1:] == ["streaming"]
        assert float(out.min()) >= -0.5
    ref = cl.wrap(torch.nn.Identity(), *constraints)(u)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_streaming_and_dense_are_different_paths():
    """The per-frame path forms no structured posterior; the stacked one does (and both hold
    the rows)."""
    u = torch.randn(2, 1, 9, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    var = torch.full_like(u, 0.5)
    total = cl.Conservation.integral(0.2)
    pred = Gaussian(u, var, event_ndim=3)
    assert choose([total], pred) == "streaming"
    assert dispatch.project(pred, [total]).conditioned is None
    both = [total, cl.Conservation.integral(0.2, dim=1)]
    assert choose(both, pred) == "dense"
    post = dispatch.project(pred, both)
    assert isinstance(post.conditioned, cl.functional.ConstrainedGaussian)
    for c in both:
        assert float(cl.metrics.conservation_error(post.mean, c).abs().max()) < 1e-12
