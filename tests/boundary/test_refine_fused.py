"""mode="refine" in one pass (spectral layers described exactly): equal to the two-hook path.

A stock neuraloperator ``SpectralConv`` is its description ``irfftn(W . rfftn(x)) + bias``: the
refinement evaluates it from the weights with T2 applied to the spectrum (``Refinement._fused``).
Any other layer (a subclass with its own forward, ``refresh`` > 1, ``kernel_grad="detached"``)
runs its own forward on the updated input (pre-hook T2, forward-hook T1). Both must give the
same outputs and gradients.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import constraint_layers as cl
from constraint_layers.boundary import refine as refine_module
from constraint_layers.boundary.spectral import Symbol

pytest.importorskip("neuralop")

from _models import complex128_spectral, fno, tfno

from constraint_layers.adapters import neuralop as neuralop_adapter

F64 = torch.float64

_D0 = cl.Dirichlet(0.5, dim=0)
_N1 = cl.Neumann(1.0, dim=1, order=3)

CASES = {
    "1d-neumann": (lambda dt: fno((8,), hidden=4, dtype=dt), (2, 1, 32),
                   [cl.Neumann(0.0, side="low"), cl.Neumann(5.0, side="high")]),
    "1d-odd-grid-padded": (lambda dt: fno((6,), hidden=3, dtype=dt, domain_padding=0.25),
                           (2, 1, 23), [cl.Dirichlet(1.0, side="low")]),
    "2d-dirichlet-x-neumann-y": (lambda dt: fno((6, 6), hidden=4, dtype=dt), (2, 1, 16, 12),
                                 [_D0, _N1]),
    "2d-last-axis-high": (lambda dt: fno((4, 6), hidden=3, dtype=dt), (1, 1, 8, 14),
                          [cl.Dirichlet(0.0, dim=1, side="high")]),
    "2d-tucker-padded-periodic-y": (
        lambda dt: tfno((6, 4), hidden=3, dtype=dt, domain_padding=0.2), (2, 1, 20, 10),
        [cl.Dirichlet(0.0, dim=0, side="low"), cl.Periodic(dim=1)]),
    "2d-nyquist-all-modes": (lambda dt: fno((8, 8), hidden=2, dtype=dt), (2, 1, 8, 8),
                             [_D0, _N1]),
    "3d-three-axes": (lambda dt: fno((4, 4, 4), hidden=3, dtype=dt, domain_padding=0.25),
                      (1, 1, 8, 8, 6), [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1),
                                        cl.Dirichlet(0.0, dim=2, side="low")]),
}  # fmt: skip


def _count_one_pass_calls(mp) -> list:
    """A list that receives an entry per call of the one-pass refinement (``mp``: a
    monkeypatch or its context)."""
    calls: list = []
    real = refine_module.Refinement._fused
    mp.setattr(
        refine_module.Refinement,
        "_fused",
        lambda self, *a, **k: calls.append(1) or real(self, *a, **k),
    )
    return calls


def _output_and_grads(model, bcs, x, fused: bool, monkeypatch):
    """The refined output and the gradients of a fixed functional, with the one-pass path on
    or off (off: the adapter reports the layer as not described exactly)."""
    with monkeypatch.context() as mp:
        if not fused:
            mp.setattr(neuralop_adapter, "_stock_forward", lambda conv: False)
        calls = _count_one_pass_calls(mp)
        wrapped = cl.wrap(model, *bcs, mode="refine")
        xg = x.clone().requires_grad_()
        y = wrapped(xg)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        params = [p for p in model.parameters() if p.requires_grad]
        grads = torch.autograd.grad((y * w).sum(), [xg, *params])
        with torch.no_grad():
            y_nograd = wrapped(x)
        cl.unwrap(wrapped)
    n_convs = len(model.fno_blocks.convs)
    assert len(calls) == (2 * n_convs if fused else 0)
    return y.detach(), y_nograd, grads


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_one_pass_equals_the_two_hook_path(name, dtype, monkeypatch):
    make, shape, bcs = CASES[name]
    torch.manual_seed(0)
    model = make(dtype)
    x = torch.randn(shape, dtype=dtype)
    # float64: the hook path runs neuraloperator's layer at full precision (it allocates its
    # output spectrum in complex64 otherwise)
    with complex128_spectral() if dtype == F64 else contextlib.nullcontext():
        y1, n1, g1 = _output_and_grads(model, bcs, x, True, monkeypatch)
        y2, n2, g2 = _output_and_grads(model, bcs, x, False, monkeypatch)
    tol = 1e-11 if dtype == F64 else 2e-4
    for got, want in [(y1, y2), (n1, n2), *zip(g1, g2)]:
        assert (got - want).abs().max() <= tol * (1 + want.abs().max())


def test_layers_not_described_exactly_run_their_own_forward(monkeypatch):
    """A subclass with its own forward, refresh > 1 and detached kernels: the two-hook path."""
    from neuralop.layers.spectral_convolution import SpectralConv

    class Scaled(SpectralConv):
        def forward(self, x, output_shape=None):
            return 2.0 * super().forward(x, output_shape=output_shape)

    calls = _count_one_pass_calls(monkeypatch)
    torch.manual_seed(0)
    model = fno((6,), hidden=3, dtype=F64)
    x = torch.randn(2, 1, 20, dtype=F64)
    for opts in ({"refresh": 3}, {"kernel_grad": "detached"}):
        wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine", **opts)
        wrapped(x).sum().backward()
        cl.unwrap(wrapped)
    assert not calls  # training with frozen or detached blocks: the layer's own forward
    torch.manual_seed(0)
    scaled = fno((6,), hidden=3, dtype=F64, conv_module=Scaled)
    assert not neuralop_adapter._stock_forward(scaled.fno_blocks.convs[0])
    wrapped = cl.wrap(scaled, cl.Dirichlet(0.0), mode="refine")
    y = wrapped(x)
    assert not calls
    assert bool((y[..., 0] == 0).all())  # exact all the same


def test_frozen_blocks_never_freeze_the_layer_itself(monkeypatch):
    """refresh=k reuses K_BB^+ for k weight changes; the layer's product always uses the
    current weights (in inference too), as in the two-hook path."""
    outs = {}
    for fused in (True, False):
        with monkeypatch.context() as mp:
            if not fused:
                mp.setattr(neuralop_adapter, "_stock_forward", lambda conv: False)
            torch.manual_seed(0)
            model = fno((6,), hidden=3, dtype=F64)
            x = torch.randn(2, 1, 20, dtype=F64)
            wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine", refresh=3)
            got = []
            with complex128_spectral(), torch.no_grad():
                got.append(wrapped(x))
                model.fno_blocks.convs[0].weight.tensor.data.mul_(1.5)
                got.append(wrapped(x))  # frozen block, new weights in the product
            outs[fused] = got
    assert (outs[True][0] - outs[False][0]).abs().max() < 1e-12
    assert (outs[True][1] - outs[False][1]).abs().max() < 1e-12
    assert (outs[True][1] - outs[True][0]).abs().max() > 1e-3


def test_forward_attribute_is_restored_and_a_replaced_forward_is_run():
    torch.manual_seed(0)
    model = fno((6,), hidden=3)
    conv = model.fno_blocks.convs[0]
    own = conv.forward  # a bound method set on the instance by the user, kept through wrap
    conv.forward = own
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    assert isinstance(conv.__dict__["forward"], refine_module._FusedForward)
    x = torch.randn(2, 1, 16)
    plain = model(x)  # outside the wrapper: the layer's own forward
    refined = wrapped(x)
    cl.unwrap(wrapped)
    assert conv.__dict__["forward"] is own
    assert torch.equal(model(x), plain)
    del conv.forward
    # a forward replaced after wrapping runs (on the updated input): the same refined layer
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    conv.forward = lambda v, output_shape=None: type(conv).forward(conv, v)
    assert (wrapped(x) - refined).abs().max() < 1e-5
    del conv.forward
    cl.unwrap(wrapped)


def test_an_input_replaced_by_a_later_pre_hook_is_the_one_refined():
    torch.manual_seed(0)
    model = fno((6,), hidden=3, dtype=F64)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    conv = model.fno_blocks.convs[0]
    v = torch.randn(2, 3, 16, dtype=F64)
    phys = torch.zeros(2, 1, 16, dtype=F64)
    with torch.no_grad(), wrapped._context.call(wrapped.bcs, phys):
        want = conv(2 * v)
        handle = conv.register_forward_pre_hook(lambda m, a: (2 * a[0],))
        got = conv(v)
        handle.remove()
        # a hook that changes the input's shape: refused, with the shape it expected
        handle = conv.register_forward_pre_hook(lambda m, a: (a[0][:1],))
        with pytest.raises(cl.errors.GridError, match=r"expected \(2, 3, 16\)"):
            conv(v)
        handle.remove()
    assert torch.equal(got, want)
    assert torch.equal(got[..., 0], (2 * v[..., 0] + conv.bias[..., 0]).expand_as(got[..., 0]))


def test_output_shape_other_than_the_grid_is_refused():
    torch.manual_seed(0)
    model = fno((6,), hidden=3)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    conv = model.fno_blocks.convs[0]
    v = torch.randn(2, 3, 16)
    with wrapped._context.call(wrapped.bcs, torch.zeros(2, 1, 16)):
        with pytest.raises(cl.errors.GridError, match="keep its grid"):
            conv(v, output_shape=(32,))


BOXES = [
    ((8,), ((0, 1, 2, 3),)),
    ((7,), ((0, 2, 3),)),
    ((8, 6), ((0, 1, 7), (0, 1, 2))),
    ((6, 8), ((0, 1, 5), (1, 3, 4))),  # last axis: not a prefix, with the Nyquist column
    ((4, 4, 5), ((0, 1, 3), (0, 1, 3), (0, 1, 2))),
]


@pytest.mark.parametrize(("grid", "box"), BOXES)
def test_box_fft_with_faces_gradcheck_and_equals_rfftn(grid, box):
    sym = Symbol(torch.zeros(1), tuple(torch.tensor(b) for b in box), grid)
    dims = (2, 1 + len(grid))
    idx = (torch.tensor([0, grid[0] - 1]), torch.tensor([1]))
    torch.manual_seed(0)
    v = torch.randn(1, 2, *grid, dtype=F64, requires_grad=True)

    def run(v):
        out = sym.box_fft_and_faces(v, dims, idx)
        return tuple(torch.view_as_real(o) if o.is_complex() else o for o in out)

    assert torch.autograd.gradcheck(run, (v,))
    assert torch.autograd.gradgradcheck(run, (v,), fast_mode=True)
    full = torch.fft.rfftn(v.detach(), dim=tuple(range(2, 2 + len(grid))))
    for d, b in enumerate(box):
        full = full.index_select(2 + d, torch.tensor(b))
    assert torch.allclose(sym.box_fft_and_faces(v.detach(), dims, idx)[0], full, atol=1e-12)
    y = torch.randn(1, 2, *(len(b) for b in box), dtype=torch.complex128)
    dims = tuple(range(2, 2 + len(grid)))
    want = torch.fft.irfftn(sym._scatter(y), s=grid, dim=dims)
    assert torch.allclose(sym.box_ifft(y), want, atol=1e-12)


def test_respond_gradcheck_and_equals_the_complex_product():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 2, dtype=torch.complex128, requires_grad=True)
    x = torch.randn(2, 3, 5, 2, dtype=torch.complex128, requires_grad=True)

    def run(h, x):
        sym = Symbol(h, (torch.arange(5), torch.arange(2)), (10, 4))
        return torch.view_as_real(sym.respond(x))

    assert torch.autograd.gradcheck(run, (h, x))
    assert torch.autograd.gradgradcheck(run, (h, x))
    want = torch.einsum("iokl,bikl->bokl", h.detach(), x.detach())
    got = Symbol(h.detach(), (torch.arange(5), torch.arange(2)), (10, 4)).respond(x.detach())
    assert torch.allclose(got, want, atol=1e-12)
