"""How far the regularised refinement is from exact elimination, as a function of ``rcond``.

    OMP_NUM_THREADS=1 .venv/bin/python examples/boundary_paper/refine_rcond.py

For one spectral convolution of a freshly initialised neuraloperator FNO (float64, the layer
computing in complex128), on the input the layer sees inside the model, prints per width ``C``
(1, 4, 32) and ``rcond``:

- ``dist``: ``||A~(v) - A~_exact(v)|| / ||A~_exact(v) - A(v)||`` over the interior rows: the
  distance of the refined layer to exact elimination (``rcond=0``: pseudo-inverse of ``K_BB``),
  relative to the size of the exact update;
- ``update``: ``||A~(v) - A(v)|| / ||A(v)||`` over the interior: how much the refinement moves the
  layer's output (exact elimination of an ill-conditioned ``K_BB`` moves it a lot);
- ``decouple``: the boundary residual that T2 leaves for T1, ``||(L v')_B - v_B|| / ||(L v)_B -
  v_B||`` on an input with zero boundary values (achievable in full by exact elimination on one
  axis; with two axes a block-Jacobi step leaves the cross-coupling of the axes).

Cases: 1D Dirichlet at both ends (N = 64, 16 modes, no padding), and 2D Dirichlet on x and
Neumann on y (32 x 32, 8 x 8 modes) where ``decouple`` also measures the block-Jacobi step
against two and four Jacobi sweeps over the axes (``jacobi2``, ``jacobi4``: the joint T2 a
library option could offer).

Last, on a small 2D grid (24 x 24, C = 1, 4), the block-Jacobi step against a joint T2 over
all faces of both axes, solved densely from the layer's matrix (Tikhonov with the Frobenius norm
of the whole boundary block): ``jacobi`` and ``joint`` are the ``decouple`` ratios, ``vs joint``
the distance between the two refined interiors.

Trained accuracy against ``rcond`` is measured with the experiments' ``--rcond`` option
(``heat.py --tasks heat_single --models refine --rcond 1e-2``; RESULTS.md "rcond").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import constraint_layers as cl

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from _models import complex128_spectral, fno

RCONDS = (0.0, 1e-8, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
F64 = torch.float64


def _layer_input(wrapped, x, layer):
    seen = {}
    handle = layer.register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("v", args[0]), prepend=True
    )
    with torch.no_grad():
        wrapped(x)
    handle.remove()
    return seen["v"].detach()


def _faces(hook, v, grid, bcs):
    pads = tuple((m - n) // 2 for m, n in zip(v.shape[2:], grid))
    faces = {}
    for bc in bcs:
        d = bc.dim % len(grid)
        pos = [pads[d] if s == "low" else pads[d] + grid[d] - 1 for s in bc.sides]
        faces[d] = tuple(sorted(set(faces.get(d, ())) | set(pos)))
    return tuple(faces.items()), pads


def _mask(shape, faces):
    mask = torch.zeros(shape, dtype=torch.bool)
    for d, pos in faces:
        for p in pos:
            mask.select(d, p).fill_(True)
    return mask


def _refined(hook, layer, v, faces, pads, k=1):
    """The refined layer's output before T1 and ``A(0)``, with ``k`` Jacobi sweeps of T2 over
    the axes (each eliminates the boundary residual the previous ones left)."""
    kernel = hook._kernel(tuple(v.shape[2:]), v.shape[1])
    prep = hook._build(layer, v, kernel, faces, pads)
    u = v
    for _ in range(k):
        u = hook._update(prep, u, faces, target=v)
    return layer(u), layer(torch.zeros_like(v[:1]))


def run_case(name, n_modes, grid, bcs, widths=(1, 4, 32)):
    print(f"\n{name}: grid {grid}, n_modes {n_modes}, conditions {bcs}")
    print(
        f"{'C':>3s} {'rcond':>7s} {'smin/smax':>10s} {'dist':>9s} {'update':>9s} "
        f"{'decouple':>9s} {'jacobi2':>9s} {'jacobi4':>9s}"
    )
    for c in widths:
        torch.manual_seed(0)
        model = fno(n_modes, hidden=c, dtype=F64, channel_mlp_expansion=1.0)
        wrapped = cl.wrap(model, *bcs, mode="refine")
        hook, layer = wrapped.refinements[1], model.fno_blocks.convs[1]
        x = torch.randn(4, 1, *grid, dtype=F64)
        with complex128_spectral(), torch.no_grad():
            v = _layer_input(wrapped, x, layer)
            faces, pads = _faces(hook, v, grid, bcs)
            mask = _mask(v.shape[2:], faces)
            plain = layer(v)
            v0 = v.clone()
            v0[..., mask] = 0
            outs, rows = {}, {}
            for rcond in RCONDS:
                hook.rcond = rcond
                hook._cache = {}
                outs[rcond], bias = _refined(hook, layer, v, faces, pads)
                before = (layer(v0) - bias)[..., mask].norm()
                rows[rcond] = []
                for k in (1, 2, 4):
                    pre, _ = _refined(hook, layer, v0, faces, pads, k)
                    rows[rcond].append(float((pre - bias)[..., mask].norm() / before))
            smin = min(hook.stats.values())
            exact = outs[0.0]
            scale = (exact - plain)[..., ~mask].norm()
            for rcond in RCONDS:
                dist = float((outs[rcond] - exact)[..., ~mask].norm() / scale)
                update = float((outs[rcond] - plain)[..., ~mask].norm() / plain[..., ~mask].norm())
                jac = " ".join(f"{r:9.2e}" for r in rows[rcond])
                print(f"{c:3d} {rcond:7.0e} {smin:10.2e} {dist:9.2e} {update:9.2e} {jac}")
        cl.unwrap(wrapped)


def joint_case(n_modes=(8, 8), grid=(24, 24), widths=(1, 4), rconds=(0.0, 1e-5, 1e-3)):
    """Block Jacobi (the library) against a joint T2 over all faces of both axes (dense, from
    the layer's matrix: small grids only). ``decouple`` as above; ``vs joint``: distance of the
    block-Jacobi interior to the joint one, relative to the joint update."""
    bcs = [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1)]
    print(f"\njoint T2 vs block Jacobi: grid {grid}, n_modes {n_modes}, {bcs}")
    print(f"{'C':>3s} {'rcond':>7s} {'jacobi':>9s} {'joint':>9s} {'vs joint':>9s}")
    for c in widths:
        torch.manual_seed(0)
        model = fno(n_modes, hidden=c, dtype=F64, channel_mlp_expansion=1.0)
        wrapped = cl.wrap(model, *bcs, mode="refine")
        hook, layer = wrapped.refinements[1], model.fno_blocks.convs[1]
        x = torch.randn(2, 1, *grid, dtype=F64)
        with complex128_spectral(), torch.no_grad():
            v = _layer_input(wrapped, x, layer)
            faces, pads = _faces(hook, v, grid, bcs)
            mask = _mask(v.shape[2:], faces)
            v0 = v.clone()
            v0[..., mask] = 0
            size = v[0].numel()
            bias = layer(torch.zeros_like(v[:1]))
            basis = torch.eye(size, dtype=F64).reshape(size, *v.shape[1:])
            kmat = (layer(basis) - bias).reshape(size, size).T  # K[(o, y), (i, x)]
            b = mask.expand(v.shape[1:]).reshape(-1).nonzero().flatten()
            kbb = kmat[b][:, b]
            for rcond in rconds:
                hook.rcond = rcond
                hook._cache = {}
                rows = []
                outs = []
                for u in (v0, v):
                    jac, _ = _refined(hook, layer, u, faces, pads)
                    flat = u.reshape(u.shape[0], -1)
                    r = flat[:, b] - (flat @ kmat.T)[:, b]
                    if rcond == 0:
                        delta = r @ torch.linalg.pinv(kbb).T
                    else:
                        lam2 = (rcond * torch.linalg.matrix_norm(kbb)) ** 2
                        lhs = kbb.T @ kbb + lam2 * torch.eye(len(b), dtype=F64)
                        delta = torch.linalg.solve(lhs, kbb.T @ r.T).T
                    up = flat.clone()
                    up[:, b] += delta
                    joint = layer(up.reshape(u.shape))
                    outs.append((jac, joint))
                before = (layer(v0) - bias)[..., mask].norm()
                for out in outs[0]:
                    rows.append(float((out - bias)[..., mask].norm() / before))
                jac, joint = outs[1]
                plain = layer(v)
                vs = (jac - joint)[..., ~mask].norm() / (joint - plain)[..., ~mask].norm()
                print(f"{c:3d} {rcond:7.0e} {rows[0]:9.2e} {rows[1]:9.2e} {float(vs):9.2e}")
        cl.unwrap(wrapped)


def main() -> None:
    torch.set_num_threads(1)
    run_case("1D Dirichlet", (16,), (64,), [cl.Dirichlet(0.0)])
    run_case(
        "2D Dirichlet x, Neumann y",
        (8, 8),
        (32, 32),
        [cl.Dirichlet(0.0, dim=0), cl.Neumann(0.0, dim=1)],
        widths=(1, 4, 32),
    )
    joint_case()


if __name__ == "__main__":
    main()
