"""mode="refine": the closed-form symbol, dense references, periodic rows, state and threads."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import constraint_layers as cl
from constraint_layers.boundary.spectral import symbol_from_kernel

pytest.importorskip("neuralop")

from _models import complex128_spectral, fno, tfno

from constraint_layers.adapters.neuralop import spectral_kernel

F64 = torch.float64


# ------------------------------------------------------------------ closed form vs measured
SYMBOL_CASES = [
    ("dense-1d", lambda: fno((8,), hidden=3, dtype=F64), (20,)),
    ("dense-1d-nyquist", lambda: fno((8,), hidden=2, dtype=F64), (8,)),
    ("dense-2d-all-modes", lambda: fno((8, 8), hidden=2, dtype=F64), (8, 8)),
    ("tucker-2d", lambda: tfno((6, 4), hidden=3, dtype=F64), (16, 10)),
    ("cp-2d", lambda: fno((6, 4), hidden=3, dtype=F64, factorization="cp", rank=0.5), (12, 10)),
    ("tt-2d", lambda: fno((6, 4), hidden=3, dtype=F64, factorization="tt", rank=0.5), (12, 10)),
    ("tucker-factorized-impl", lambda: tfno((6, 4), hidden=3, dtype=F64,
                                            implementation="factorized"), (12, 10)),
    ("separable-2d", lambda: fno((6, 4), hidden=3, dtype=F64, separable=True), (12, 10)),
    ("dense-3d", lambda: fno((4, 4, 4), hidden=2, dtype=F64), (8, 8, 6)),
    ("fewer-modes-than-max", lambda: _fewer_modes(fno((8, 6), hidden=3, dtype=F64)), (12, 10)),
]  # fmt: skip


def _fewer_modes(model):
    model.fno_blocks.convs[0].n_modes = (4, 4)  # below max_n_modes: weights sliced at the centre
    return model


#: the closed form assumes irfftn keeps the Hermitian part of a spectrum on the planes
#: k_last = 0, M / 2 (checked on every device the tests see: cuFFT documents no behaviour there)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("make", "grid"), [c[1:] for c in SYMBOL_CASES],
                         ids=[c[0] for c in SYMBOL_CASES])  # fmt: skip
def test_closed_form_symbol_equals_the_measured_one(make, grid, device):
    torch.manual_seed(0)
    conv = make().fno_blocks.convs[0].to(device)
    c = conv.in_channels
    with complex128_spectral(), torch.no_grad():
        impulses = torch.zeros((c + 1, c, *grid), dtype=F64, device=device)
        impulses[(torch.arange(c), torch.arange(c), *([0] * len(grid)))] = 1.0  # at node 0
        out = conv(impulses)
        measured = torch.fft.rfftn(out[:c] - out[c:], dim=list(range(2, 2 + len(grid))))
        closed = symbol_from_kernel(spectral_kernel(conv, grid)).dense()
    assert closed.shape == measured.shape
    err = (closed - measured).abs().max() / measured.abs().max()
    assert err < 1e-10


def test_odd_layer_grid_is_refused_where_neuralop_is_not_shift_invariant():
    model = fno((4, 4), hidden=2)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0, dim=0), mode="refine")
    with pytest.raises(cl.errors.GridError, match="not shift invariant"):
        wrapped(torch.randn(1, 1, 9, 8))
    wrapped(torch.randn(1, 1, 8, 9))  # odd along the last axis is fine


# --------------------------------------------------------------- dense reference, 1e-10
def _axis(bc, n):
    """The spatial axis of a condition (``dim=None`` resolves where conditions support it)."""
    return bc.axis(n, "test") if hasattr(bc, "axis") else bc.dim % n


def _dense_refined(layer, v, phys, bcs, rcond):
    """The refined layer from dense matrices: T2 per eliminated axis (Tikhonov with the same
    rule), T1 rows in the order of the conditions, periodic rows averaged (BOON's periodic
    correction). ``layer`` runs without refinement here."""
    grid = tuple(v.shape[2:])
    c = v.shape[1]
    n = len(grid)
    pads = [(m - p) // 2 for m, p in zip(grid, phys)]
    size = c * int(torch.tensor(grid).prod())
    zero = layer(torch.zeros_like(v[:1]))  # A(0)
    basis = torch.eye(size, dtype=v.dtype).reshape(size, c, *grid)
    kmat = (layer(basis) - zero).reshape(size, size).T  # K[(o, y), (i, x)]
    flat_v = v.reshape(v.shape[0], size)
    lin = flat_v @ kmat.T

    def pos(d, side):
        return pads[d] if side == "low" else pads[d] + phys[d] - 1

    def face_idx(d, sides):
        mask = torch.zeros((c, *grid), dtype=torch.bool)
        for side in sides:
            mask.select(1 + d, pos(d, side)).fill_(True)
        return mask.reshape(-1).nonzero().flatten()

    eliminate = {}
    for bc in bcs:
        if not isinstance(bc, cl.Periodic):
            d = _axis(bc, n)
            eliminate.setdefault(d, [])
            eliminate[d] += [s for s in bc.sides if s not in eliminate[d]]
    vp = flat_v.clone()
    for d, sides in eliminate.items():
        b = face_idx(d, sides)
        kbb = kmat[b][:, b]
        r = flat_v[:, b] - lin[:, b]
        lhs = kbb.T @ kbb + rcond**2 * _largest_block_norm2(
            kbb, c, grid, d, len(sides)
        ) * torch.eye(len(b), dtype=v.dtype)
        vp[:, b] += torch.linalg.solve(lhs, kbb.T @ r.T).T
    y = layer(vp.reshape(v.shape)).clone()
    for bc in bcs:
        a = 2 + _axis(bc, n)
        if isinstance(bc, cl.Periodic):
            lo, hi = pos(_axis(bc, n), "low"), pos(_axis(bc, n), "high")
            avg = 0.5 * (y.select(a, lo) + y.select(a, hi))
            y.select(a, lo).copy_(avg)
            y.select(a, hi).copy_(avg)
        else:
            for side in bc.sides:
                p = pos(_axis(bc, n), side)
                y.select(a, p).copy_(v.select(a, p) + zero.select(a, p))
    return y


def _largest_block_norm2(kbb, c, grid, axis, s):
    """max over tangential frequencies of ||K_BB(xi)||_F^2 for a dense block-circulant K_BB
    (rows and columns ordered (channel, *grid with S positions along ``axis``))."""
    fshape = list(grid)
    fshape[axis] = s
    n = len(grid)
    k = kbb.reshape(c, *fshape, c, *fshape)
    tan = [d for d in range(n) if d != axis]
    for d in sorted(tan, reverse=True):  # the columns at tangential position 0
        k = k.select(1 + n + 1 + d, 0)
    dims = [1 + d for d in tan]
    if dims:
        k = torch.fft.fftn(k, dim=dims)
    k = k.movedim(1 + axis, 1)  # (C, S, *tan_freq, C, S)
    k = k.reshape(c * s, -1, c * s) if tan else k.reshape(c * s, 1, c * s)
    return k.abs().square().sum(dim=(0, 2)).amax()


DENSE_CASES = [
    ("1d-dirichlet", (6,), (14,), [cl.Dirichlet(0.0)], None),
    ("1d-neumann-low-padded", (6,), (12,), [cl.Neumann(1.0, side="low")], 0.25),
    ("1d-periodic", (6,), (14,), [cl.Periodic()], None),
    ("2d-dirichlet-x-neumann-y", (4, 4), (8, 6), [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1)], None),
    ("2d-periodic-t-dirichlet-x", (4, 4), (8, 6), [cl.Periodic(dim=1), cl.Dirichlet(0.0, dim=0)], None),
    ("2d-neumann-x-periodic-t", (4, 4), (8, 6), [cl.Neumann(0.0, dim=0, side="high"), cl.Periodic(dim=1)], None),
    ("3d-three-axes", (4, 4, 4), (6, 4, 4), [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1),
                                             cl.Dirichlet(1.0, dim=2, side="low")], None),
]  # fmt: skip


@pytest.mark.parametrize(("n_modes", "grid", "bcs", "pad"), [c[1:] for c in DENSE_CASES],
                         ids=[c[0] for c in DENSE_CASES])  # fmt: skip
def test_refined_layers_equal_the_dense_reference(n_modes, grid, bcs, pad):
    torch.manual_seed(0)
    model = fno(n_modes, hidden=2, dtype=F64, **({"domain_padding": pad} if pad else {}))
    rcond = 1e-3
    wrapped = cl.wrap(model, *bcs, mode="refine", rcond=rcond)
    x = torch.randn(2, 1, *grid, dtype=F64)
    with complex128_spectral(), torch.no_grad():
        for layer in model.fno_blocks.convs:
            v = _layer_input(wrapped, x, layer)
            with wrapped._context.call(wrapped.bcs, x):
                got = layer(v)
            want = _dense_refined(layer, v, grid, bcs, rcond)
            assert (got - want).abs().max() < 1e-10 * (1 + want.abs().max())


def _layer_input(wrapped, x, layer):
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("v", args[0]), prepend=True
    )
    wrapped(x)
    handle.remove()
    return seen["v"].detach()


def test_periodic_layers_end_rows_are_equal():
    """The issue's reproducer: a one-layer FNO wrapped with Periodic, mode="refine"."""
    torch.manual_seed(0)
    model = fno((8,), hidden=4, n_layers=1)
    wrapped = cl.wrap(model, cl.Periodic(), mode="refine")
    rows = {}
    conv = model.fno_blocks.convs[0]  # observed after the refinement's hook
    conv.register_forward_hook(lambda mod, args, out: rows.__setitem__("out", out))
    x = torch.randn(3, 1, 33)
    model(x)  # outside the wrapper: the plain layer
    assert (rows["out"][..., 0] - rows["out"][..., -1]).abs().max() > 1e-2  # not vacuous
    wrapped(x)
    assert torch.equal(rows["out"][..., 0], rows["out"][..., -1])


# ----------------------------------------------------------------------- gradients
def test_gradcheck_closed_form_in_input_and_spectral_weights():
    torch.manual_seed(0)
    model = fno((4,), hidden=2, n_layers=2, dtype=F64)
    wrapped = cl.wrap(model, cl.Dirichlet(0.5, side="low"), cl.Neumann(1.0, side="high"),
                      mode="refine")  # fmt: skip
    x = torch.randn(2, 1, 10, dtype=F64, requires_grad=True)
    params = dict(model.named_parameters())
    name = "fno_blocks.convs.1.weight.tensor"

    def through_weights(w):
        with torch.nn.utils.stateless._reparametrize_module(model, {**params, name: w}):
            return wrapped(x.detach())

    with complex128_spectral():
        assert torch.autograd.gradcheck(wrapped, (x,), fast_mode=True)
        w = params[name].detach().clone().requires_grad_()
        assert torch.autograd.gradcheck(through_weights, (w,), fast_mode=True)


def test_gradgradcheck_closed_form_in_input():
    """Double backward (create_graph) through the refined layers' K_BB^+ solve, whose first
    derivative is in closed form."""
    torch.manual_seed(0)
    model = fno((4,), hidden=2, n_layers=1, dtype=F64)
    wrapped = cl.wrap(model, cl.Dirichlet(0.5, side="low"), cl.Neumann(1.0, side="high"),
                      mode="refine")  # fmt: skip
    x = torch.randn(1, 1, 8, dtype=F64, requires_grad=True)
    with complex128_spectral():
        assert torch.autograd.gradgradcheck(wrapped, (x,), fast_mode=True)


def test_gradcheck_mixed_periodic_and_dirichlet_2d():
    torch.manual_seed(0)
    model = fno((4, 4), hidden=2, n_layers=1, dtype=F64)
    wrapped = cl.wrap(model, cl.Periodic(dim=1), cl.Dirichlet(0.0, dim=0, side="low"),
                      mode="refine")  # fmt: skip
    x = torch.randn(1, 1, 6, 4, dtype=F64, requires_grad=True)
    with complex128_spectral():
        assert torch.autograd.gradcheck(wrapped, (x,), fast_mode=True)


def test_detached_kernel_grad_differs_from_exact():
    torch.manual_seed(0)
    model = fno((4,), hidden=2, n_layers=2, dtype=F64)
    x = torch.randn(2, 1, 12, dtype=F64)
    grads = {}
    for mode in ("exact", "detached"):
        wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine", kernel_grad=mode)
        model.zero_grad()
        wrapped(x).square().sum().backward()
        grads[mode] = model.fno_blocks.convs[0].weight.tensor.grad.clone()
        cl.unwrap(wrapped)
    assert (grads["exact"] - grads["detached"]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="kernel_grad must be one of"):
        cl.wrap(model, cl.Dirichlet(0.0), mode="refine", kernel_grad="frozen")


# ------------------------------------------------------------------ state, cache, threads
def _fresh(model, x):
    """The output of a freshly wrapped copy (no state carried over)."""
    with torch.no_grad():
        return cl.wrap(copy.deepcopy(model), cl.Dirichlet(0.0), mode="refine")(x)


CHANGES = {
    "data.copy_": lambda m: m.fno_blocks.convs[0].weight.tensor.data.copy_(
        2 * m.fno_blocks.convs[0].weight.tensor.data
    ),
    "data=": lambda m: setattr(
        m.fno_blocks.convs[0].weight.tensor, "data", 2 * m.fno_blocks.convs[0].weight.tensor.data
    ),
    "lerp_": lambda m: m.fno_blocks.convs[0].weight.tensor.lerp_(
        torch.ones_like(m.fno_blocks.convs[0].weight.tensor), 0.5
    ),
    "n_modes": lambda m: setattr(m.fno_blocks.convs[0], "n_modes", (4,)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_no_stale_state_after_weight_changes(change):
    torch.manual_seed(0)
    model = fno((8,), hidden=4)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    x = torch.randn(2, 1, 32)
    with torch.no_grad():
        before = wrapped(x)
        CHANGES[change](model)
        after = wrapped(x)
    assert (after - before).abs().max() > 1e-4
    assert torch.equal(after, _fresh(model, x))


def test_inference_mode_then_training_with_refresh():
    torch.manual_seed(0)
    model = fno((8,), hidden=4)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine", refresh=10)
    x = torch.randn(2, 1, 32)
    with torch.inference_mode():
        wrapped(x)
    opt = torch.optim.SGD(wrapped.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        wrapped(x).square().mean().backward()
        opt.step()


def test_threads_at_mixed_resolutions_get_their_own_state():
    torch.manual_seed(0)
    # neuraloperator's GridEmbeddingND caches its grid per resolution in the module: the plain
    # FNO itself fails under threads at mixed resolutions, so the embedding is left out here
    model = fno((8,), in_channels=2, hidden=4, positional_embedding=None)
    wrapped = cl.wrap(
        model, cl.Dirichlet(0.0, side="low"), cl.Neumann(1.0, side="high"), mode="refine"
    )
    inputs = [torch.randn(2, 2, n) for n in (24, 32, 40, 80)]
    with torch.no_grad():
        want = [wrapped(x) for x in inputs]
    errors, wrong = [], []

    def work(i):
        try:
            for _ in range(8):
                with torch.no_grad():
                    for j in (i, (i + 1) % 4):
                        if not torch.allclose(wrapped(inputs[j]), want[j], atol=1e-6):
                            wrong.append(j)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not wrong


def test_jit_trace_refuses():
    model = fno((4,), hidden=2)
    wrapped = cl.wrap(model, cl.Dirichlet(0.0), mode="refine")
    with pytest.raises(NotImplementedError, match="torch.jit.trace"):
        torch.jit.trace(wrapped, torch.randn(1, 1, 16), check_trace=False)


# ------------------------------------------------------------------------------- 3D grids
@pytest.mark.parametrize(
    "bcs",
    [
        [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1), cl.Dirichlet(0.0, dim=2)],  # x, y, z
        [cl.Dirichlet(0.0, dim=0), cl.Dirichlet(0.0, dim=1), cl.Dirichlet(0.0, dim=2, side="low")],
    ],
    ids=["xyz", "xyt"],
)
def test_3d_boundary_outputs_ignore_the_interior(bcs):
    torch.manual_seed(0)
    model = fno((4, 4, 4), hidden=3, dtype=F64, domain_padding=0.25)
    wrapped = cl.wrap(model, *bcs, mode="refine")
    grid = (8, 8, 6)
    x = torch.randn(1, 1, *grid, dtype=F64)
    y = wrapped(x)
    assert cl.metrics.boundary_error(y, wrapped.bcs).max() < 1e-10
    for layer in model.fno_blocks.convs:
        v = _layer_input(wrapped, x, layer).requires_grad_()
        pads = [(m - n) // 2 for m, n in zip(v.shape[2:], grid)]
        mask = torch.zeros(v.shape[2:], dtype=torch.bool)
        for bc in bcs:
            for side in bc.sides:
                p = pads[bc.dim] + (0 if side == "low" else grid[bc.dim] - 1)
                mask.select(bc.dim, p).fill_(True)
        with wrapped._context.call(wrapped.bcs, x):
            out = layer(v)
        g = torch.autograd.grad((out * torch.randn_like(out) * mask).sum(), v)[0]
        assert g[..., ~mask].abs().max() == 0
        assert g[..., mask].abs().max() > 0.1
