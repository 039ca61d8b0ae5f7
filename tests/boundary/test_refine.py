"""mode="refine": BOON's kernel refinement of neuraloperator spectral convolutions."""

from __future__ import annotations

import pytest
import torch

import constraint_layers as cl
from constraint_layers.testing import RESIDUAL_TOL, BoundaryLayerChecks, relative_residual

pytest.importorskip("neuralop")

from _models import fno, tfno, uno


class TestRefinedFNO1dNeumann(BoundaryLayerChecks):
    def make_model(self, dtype):
        return fno((8,), in_channels=2, dtype=dtype)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 2, 48, dtype=dtype)

    def conditions(self):
        return [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]

    def options(self):
        return {"mode": "refine"}


class TestRefinedTFNOxtDirichletPadded(BoundaryLayerChecks):
    dtypes = (torch.float32,)

    def make_model(self, dtype):
        return tfno((6, 4), dtype=dtype, domain_padding=0.2)

    def make_input(self, batch, dtype):
        return torch.randn(batch, 1, 30, 10, dtype=dtype)

    def conditions(self):
        return [cl.Dirichlet(torch.linspace(-1, 1, 10), dim=0, side="low")]

    def options(self):
        return {"mode": "refine"}


def _layer_io(wrapped, x, layer):
    """The input of ``layer`` during a wrapped call, and the refined layer as a function."""
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("v", args[0]), prepend=True
    )
    wrapped(x)
    handle.remove()

    def refined(v):
        with wrapped._context.call(wrapped.bcs, x):
            return layer(v)

    return seen["v"].detach(), refined


def _faces(wrapped, grid):
    """Axis -> eliminated sides (Dirichlet / Neumann; periodic axes average their end rows)."""
    faces = {}
    for bc in wrapped.bcs:
        if isinstance(bc, cl.Periodic):
            continue
        d = bc.axis(len(grid), "test") if hasattr(bc, "axis") else bc.dim % len(grid)
        faces[d] = faces.get(d, ()) + tuple(s for s in bc.sides if s not in faces.get(d, ()))
    return faces


def _face_mask(v_shape, grid, faces):
    pads = [(m - n) // 2 for m, n in zip(v_shape[2:], grid)]
    mask = torch.zeros(v_shape[2:], dtype=torch.bool)
    for d, sides in faces.items():
        for side in sides:
            idx = [slice(None)] * len(grid)
            idx[d] = pads[d] if side == "low" else pads[d] + grid[d] - 1
            mask[tuple(idx)] = True
    return mask


REFINE_CASES = [
    ("1d-both", (8,), (40,), [cl.Neumann(0.0)], None),
    ("1d-low-padded", (8,), (40,), [cl.Dirichlet(0.0, side="low")], 0.25),
    ("xt-stokes-padded", (6, 4), (30, 10), [cl.Dirichlet(1.0, dim=0, side="low")], 0.2),
    ("xt-mixed-periodic", (6, 4), (30, 10), [cl.Periodic(dim=1), cl.Dirichlet(0.0, dim=0)], None),
    ("xyt-cavity", (4, 4, 3), (12, 12, 6), [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(1.0, dim=1)], None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("n_modes", "grid", "bcs", "pad"),
    [c[1:] for c in REFINE_CASES],
    ids=[c[0] for c in REFINE_CASES],
)
def test_boundary_outputs_of_every_layer_ignore_the_interior(n_modes, grid, bcs, pad):
    torch.manual_seed(0)
    model = fno(n_modes, hidden=6, dtype=torch.float64, **({"domain_padding": pad} if pad else {}))
    wrapped = cl.wrap(model, *bcs, mode="refine")
    x = torch.randn(2, 1, *grid, dtype=torch.float64)
    for layer in model.fno_blocks.convs:
        v, refined = _layer_io(wrapped, x, layer)
        mask = _face_mask(v.shape, grid, _faces(wrapped, grid))
        v = v.requires_grad_()
        out = refined(v)
        weight = torch.randn_like(out) * mask
        grad = torch.autograd.grad((out * weight).sum(), v)[0]
        assert grad[..., ~mask].abs().max() == 0  # d(boundary outputs) / d(interior inputs)
        assert grad[..., mask].abs().max() > 0.1
        # boundary rows pass the boundary inputs through, plus the bias
        assert torch.allclose((out - layer.bias)[..., mask], v[..., mask])
        # and the plain layer did couple them (the check is not vacuous)
        plain = torch.autograd.grad((layer(v) * weight).sum(), v)[0]
        assert plain[..., ~mask].abs().max() > 1e-3


def test_t2_update_alone_decouples_when_k_bb_is_well_conditioned():
    torch.manual_seed(0)
    model = fno((8,), hidden=6, dtype=torch.float64)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine", rcond=0.0)
    wrapped(torch.randn(2, 1, 40, dtype=torch.float64))
    for ref in wrapped.refinements:
        assert ref.stats[0] > 1e-3  # well conditioned here
        assert ref.t1_gap < 1e-5  # T1 had nothing left to do (float32 spectral arithmetic)
    # with a strong regularisation T2 falls short and T1 fills the gap
    damped = cl.wrap(
        fno((8,), hidden=6, dtype=torch.float64), cl.Dirichlet(0.0), mode="refine", rcond=0.5
    )
    damped(torch.randn(2, 1, 40, dtype=torch.float64))
    assert max(r.t1_gap for r in damped.refinements) > 1e-3


def test_refined_output_is_exact_and_differs_from_output_mode():
    torch.manual_seed(0)
    model = fno((8,), in_channels=1, hidden=8)
    bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]
    x = torch.randn(4, 1, 64)
    out_mode = cl.wrap(model, *bcs)(x)
    refined = cl.wrap(model, *bcs, mode="refine")
    y = refined(x)
    assert relative_residual(y, bcs) <= RESIDUAL_TOL[torch.float32]
    assert (y - out_mode).abs().max() > 1e-3  # the refinement changes the interior


def test_hooks_act_only_inside_the_wrapper_and_unwrap_removes_them():
    torch.manual_seed(0)
    model = fno((8,), hidden=8)
    x = torch.randn(2, 1, 32)
    before = model(x)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    assert torch.equal(model(x), before)  # called on its own, the model is untouched
    assert all(len(conv._forward_hooks) == 1 for conv in model.fno_blocks.convs)
    refined_raw = wrapped.base_output(x)
    assert (refined_raw - before).abs().max() > 1e-4
    assert cl.unwrap(wrapped) is model
    assert all(len(conv._forward_hooks) == 0 for conv in model.fno_blocks.convs)
    assert torch.equal(model(x), before)


def test_spectral_convs_are_never_probed():
    """neuraloperator layers: the boundary block comes from the weights, in closed form; the
    layer runs once per call, on the data."""
    torch.manual_seed(0)
    model = fno((8,), hidden=4)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    calls = []
    handle = model.fno_blocks.convs[0].register_forward_pre_hook(
        lambda mod, args: calls.append(args[0].shape[0])
    )
    x = torch.randn(3, 1, 32)
    wrapped(x).square().mean().backward()
    with torch.no_grad():
        wrapped(x)
    handle.remove()
    assert calls == [3, 3]


def test_generic_probe_cached_by_value_in_inference_in_the_graph_in_training():
    torch.manual_seed(0)
    model = CircularNet()
    wrapped = cl.BoundaryCorrection(
        model, [cl.Dirichlet(0.0)], mode="refine", adapter=CircularAdapter()
    )
    calls = []
    layer = model.mix[0]
    original = layer.forward

    def counting(*args, **kwargs):  # the probe calls forward directly (no hooks)
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    layer.forward = counting
    x = torch.randn(3, 1, 32)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)

    def probes(fn):
        calls.clear()
        fn()
        return calls.count(4)  # the probe: C + 1 = 4 impulses and zero

    def step():
        opt.zero_grad()
        wrapped(x).square().mean().backward()
        opt.step()

    try:
        with torch.no_grad():
            assert probes(lambda: wrapped(x)) == 1
            assert probes(lambda: wrapped(x)) == 0  # inference: cached
            layer.weight.data.mul_(1.5)  # invisible to version counters: seen by value
            assert probes(lambda: wrapped(x)) == 1
        assert probes(step) == 1  # training: probed inside the graph at every call
        assert probes(step) == 1
        with torch.no_grad():
            assert probes(lambda: wrapped(x)) == 1  # new weights: probed again, then cached
            assert probes(lambda: wrapped(x)) == 0
        # refresh=3: a frozen probe serves training until the weights changed three times
        wrapped.refinements[0].refresh = 3
        assert [probes(step) for _ in range(5)] == [0, 0, 0, 1, 0]  # seen at the next forward
    finally:
        del layer.forward


def test_exact_gradients_in_training_frozen_with_refresh():
    """The directional derivative along a spectral weight, by autograd and by central finite
    differences: equal with the probe in the graph (refresh=1), not with a frozen probe."""
    torch.manual_seed(0)
    model = CircularNet().double()
    x = torch.randn(2, 1, 12, dtype=torch.float64)
    wrapped = cl.BoundaryCorrection(
        model, [cl.Dirichlet(0.5)], mode="refine", adapter=CircularAdapter()
    )
    weight = model.mix[0].weight
    direction = torch.randn_like(weight)
    cotangent = torch.randn(2, 1, 12, dtype=torch.float64)

    def value():
        return (wrapped(x) * cotangent).sum().item()

    def autograd_derivative():
        model.zero_grad()
        (wrapped(x) * cotangent).sum().backward()
        return float((weight.grad * direction).sum())

    def finite_difference(eps=1e-6):
        with torch.no_grad():
            weight.add_(eps * direction)
        up = value()
        with torch.no_grad():
            weight.sub_(2 * eps * direction)
        down = value()
        with torch.no_grad():
            weight.add_(eps * direction)
        return (up - down) / (2 * eps)

    exact = finite_difference()
    assert abs(autograd_derivative() - exact) < 1e-6 * (1 + abs(exact))
    wrapped.refinements[0].refresh = 10**6  # frozen from now on
    wrapped.refinements[1].refresh = 10**6
    with torch.no_grad():
        wrapped(x)  # probe once, without the graph
    frozen = autograd_derivative()
    assert abs(frozen - exact) > 1e-6 * (1 + abs(exact))


def test_training_step_with_refinement():
    torch.manual_seed(0)
    model = cl.wrap(
        fno((8,), in_channels=2, hidden=8),
        cl.Neumann(0.0, side="low"),
        cl.Dirichlet(1.0, side="high"),
        mode="refine",
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 2, 40), torch.randn(8, 1, 40)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert relative_residual(model(x), model.bcs) <= RESIDUAL_TOL[torch.float32]


class CircularNet(torch.nn.Module):
    """A float64-exact stand-in for an FNO: circular convolutions are shift invariant too."""

    def __init__(self, dims=1, width=3):
        super().__init__()
        conv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d}[dims]
        self.lift = conv(1, width, 1)
        self.mix = torch.nn.ModuleList(
            conv(width, width, 5, padding=2, padding_mode="circular") for _ in range(2)
        )
        self.proj = conv(width, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        for layer in self.mix:
            x = torch.nn.functional.gelu(layer(x) + x)
        return self.proj(x)


class CircularAdapter(cl.adapters.Adapter):
    """A user's adapter that asks for kernel refinement of their own shift-invariant layers."""

    name = "test-circular"
    supports_refinement = True

    def attach(self, wrapper):
        if wrapper.mode == "refine":
            for layer in wrapper.model.mix:
                wrapper.add_refinement(layer)


def test_gradcheck_through_the_refined_wrapper():
    torch.manual_seed(0)
    model = CircularNet().double()
    wrapped = cl.BoundaryCorrection(
        model,
        [cl.Dirichlet(0.5, side="low"), cl.Neumann(1.0, side="high")],
        mode="refine",
        adapter=CircularAdapter(),
    )
    x = torch.randn(2, 1, 12, dtype=torch.float64, requires_grad=True)
    wrapped(x)  # probe once; the probe is a constant of the refined layer
    assert torch.autograd.gradcheck(wrapped, (x,))
    params = dict(model.named_parameters())

    def through_weights(w):
        with torch.nn.utils.stateless._reparametrize_module(model, {**params, "mix.1.weight": w}):
            return wrapped(x.detach())

    w = params["mix.1.weight"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(through_weights, (w,))


def test_exact_refinement_of_a_float64_circular_layer():
    torch.manual_seed(0)
    model = CircularNet(dims=2, width=2).double()
    wrapped = cl.BoundaryCorrection(
        model, [cl.Dirichlet(0.0, dim=1)], mode="refine", adapter=CircularAdapter(), rcond=0.0
    )
    x = torch.randn(2, 1, 9, 16, dtype=torch.float64)
    for layer in model.mix:
        v, refined = _layer_io(wrapped, x, layer)
        mask = _face_mask(v.shape, (9, 16), _faces(wrapped, (9, 16)))
        v = v.requires_grad_()
        out = refined(v)
        grad = torch.autograd.grad((out * torch.randn_like(out) * mask).sum(), v)[0]
        assert grad[..., ~mask].abs().max() == 0
    # a 5-tap kernel on 16 nodes does not couple the two faces: K_BB is well conditioned and
    # T2 alone makes the boundary rows pass through, to float64 rounding
    assert max(r.t1_gap for r in wrapped.refinements) < 1e-12
    assert min(min(r.stats.values()) for r in wrapped.refinements) > 1e-3


def test_singular_boundary_block_does_not_blow_up():
    torch.manual_seed(0)
    model = fno((4,), hidden=4)
    with torch.no_grad():
        for conv in model.fno_blocks.convs:
            conv.weight.tensor[:, :2] = 0  # two output channels see nothing: K_BB is singular
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    y = wrapped(torch.randn(2, 1, 32))
    assert torch.isfinite(y).all()
    assert min(min(r.stats.values()) for r in wrapped.refinements) < 1e-6
    assert relative_residual(y, wrapped.bcs) == 0


def test_refine_errors_are_clear():
    with pytest.raises(ValueError, match="mode='refine' needs an adapter"):
        cl.wrap(torch.nn.Conv1d(1, 1, 3, padding=1), cl.Dirichlet(0.0), mode="refine")
    with pytest.raises((ValueError, cl.errors.GridError), match="refine"):
        cl.wrap(uno(), cl.Dirichlet(0.0), mode="refine")(torch.randn(2, 1, 32))
    with pytest.raises(ValueError, match="rcond must be"):
        cl.wrap(fno((4,)), cl.Dirichlet(0.0), mode="refine", rcond=-1.0)
    with pytest.raises(ValueError, match="refresh must be a positive int"):
        cl.wrap(fno((4,)), cl.Dirichlet(0.0), mode="refine", refresh=0)
