"""GINO on potential flow past a cylinder: plain vs wrapped with point constraints.

Data (``cl.problems.PotentialFlow``, closed form): the inflow velocity (speed and angle at random)
is the input, the velocity at scattered query points (the body's surface, an outer box, the
interior) the output. The wrapped model adds, in one ``cl.wrap``:

- no penetration at the surface: ``cl.NormalComponent(0.0, normals=..., points=surface)``;
- the far field at the outer box: ``cl.Dirichlet(cl.Given("farfield"), points=outer)`` (the inflow
  condition, known with each sample).

Both train with the same data, budget and seeds. Reported per training seed, then mean and
standard error over seeds: the mean |u . n| at the surface, the relative L2 error over all query
points and over the interior, and the seconds per training step.

Run:  python examples/pointcloud/cylinder.py [--quick] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

import constraint_layers as cl

HERE = Path(__file__).resolve().parent


def _gino(seed: int):
    from neuralop.models import GINO

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GINO(
            in_channels=2,
            out_channels=2,
            fno_in_channels=2,  # the linear input GNO multiplies its kernel by the input
            gno_coord_dim=2,
            in_gno_radius=0.12,
            out_gno_radius=0.12,
            fno_n_modes=(8, 8),
            fno_hidden_channels=16,
            fno_n_layers=2,
            projection_channel_ratio=2,
            fno_lifting_channel_ratio=2,
            gno_use_open3d=False,
        )


def setup(quick: bool):
    flow = cl.problems.PotentialFlow(radius=0.5, box=2.0)
    n_train, n_test = (48, 32) if quick else (96, 64)
    kw = dict(n_surface=32, n_interior=160, per_side=10)
    train = flow.generate(n_train, seed=1, **kw)
    test = flow.generate(n_test, seed=2, **kw)
    assert torch.equal(train.points, test.points)
    scale = 2 * flow.box
    coords = ((train.points + flow.box) / scale).float()  # in [0, 1]^2
    g = torch.linspace(0, 1, 16)
    latent = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).unsqueeze(0)
    return flow, train, test, coords, latent


def call_args(coords, latent, inflow):
    x = inflow.float()[:, None, :].expand(-1, coords.shape[0], 2)
    return dict(
        input_geom=coords.unsqueeze(0),
        latent_queries=latent,
        output_queries=coords.unsqueeze(0),
        x=x,
    )


def constraints(data):
    return [
        cl.NormalComponent(
            0.0, normals=data.normals[data.surface].float(), points=data.surface, channels=(0, 1)
        ),
        cl.Dirichlet(cl.Given("farfield"), points=data.outer),
    ]


def evaluate(model, data, coords, latent, wrapped: bool) -> dict:
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = call_args(coords, latent, data.inflow)
        if wrapped:
            kw["farfield"] = data.velocity[:, data.outer].float()
        y = model(**kw).double()
    ref = data.velocity
    un = (y[:, data.surface] * data.normals[data.surface]).sum(-1).abs()
    rel = ((y - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2))).mean()
    inner = ~(data.surface | data.outer)
    rel_in = ((y - ref)[:, inner].norm(dim=(1, 2)) / ref[:, inner].norm(dim=(1, 2))).mean()
    return {
        "surface_un": float(un.mean()),
        "rel_l2": float(rel),
        "rel_l2_interior": float(rel_in),
        "surface_sample0": y[0, data.surface].tolist(),  # for the figure
    }


def train_one(seed: int, wrapped: bool, quick: bool) -> dict:
    _, train, test, coords, latent = setup(quick)
    net = _gino(seed)
    model = cl.wrap(net, *constraints(train)) if wrapped else net
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs = 30 if quick else 80
    batch = 8
    n = len(train.inflow)
    gen = torch.Generator().manual_seed(seed)
    steps, t_steps = 0, 0.0
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, batch):
            idx = perm[i : i + batch]
            kw = call_args(coords, latent, train.inflow[idx])
            if wrapped:
                kw["farfield"] = train.velocity[idx][:, train.outer].float()
            ref = train.velocity[idx].float()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                y = model(**kw)
            loss = ((y - ref).square().sum((1, 2)) / ref.square().sum((1, 2))).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            t_steps += time.perf_counter() - t0
            steps += 1
    out = evaluate(model, test, coords, latent, wrapped)
    out["s_per_step"] = t_steps / steps
    if seed == 0:
        out["exact_surface_sample0"] = test.velocity[0, test.surface].tolist()
        out["surface_points"] = test.points[test.surface].tolist()
    out["seed"] = seed
    return out


def summarise(rows: list[dict]) -> dict:
    keys = ["surface_un", "rel_l2", "rel_l2_interior", "s_per_step"]
    out = {}
    for k in keys:
        v = torch.tensor([r[k] for r in rows], dtype=torch.float64)
        se = float(v.std(unbiased=True) / len(v) ** 0.5) if len(v) > 1 else float("nan")
        out[k] = (float(v.mean()), se)
    return out


def figure(results: dict, path: Path) -> None:
    """Normal and tangential velocity along the surface, test sample 0, training seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = next(r for r in results["plain"] if r["seed"] == 0)
    wrapped = next(r for r in results["wrapped"] if r["seed"] == 0)
    pts = torch.tensor(wrapped["surface_points"], dtype=torch.float64)
    theta = torch.atan2(pts[:, 1], pts[:, 0])
    order = torch.argsort(theta)
    n = pts / pts.norm(dim=-1, keepdim=True)
    t = torch.stack([-n[:, 1], n[:, 0]], -1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    series = (
        ("exact", wrapped["exact_surface_sample0"], "k-"),
        ("plain GINO", plain["surface_sample0"], "C0o-"),
        ("GINO + NormalComponent", wrapped["surface_sample0"], "C1s-"),
    )
    for name, vel, style in series:
        v = torch.tensor(vel, dtype=torch.float64)
        axes[0].plot(theta[order], (v * n).sum(-1)[order], style, ms=3, label=name)
        axes[1].plot(theta[order], (v * t).sum(-1)[order], style, ms=3, label=name)
    axes[0].set(xlabel="angle on the surface", ylabel="normal velocity u . n")
    axes[1].set(xlabel="angle on the surface", ylabel="tangential velocity")
    axes[0].legend(fontsize=8)
    fig.suptitle("Potential flow past a cylinder: surface velocities (test sample 0, seed 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small data and budget")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=HERE / "out")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"plain": [], "wrapped": []}
    for seed in args.seeds:
        for name in ("plain", "wrapped"):  # interleaved: the same load for both
            r = train_one(seed, name == "wrapped", args.quick)
            results[name].append(r)
            shown = {k: v for k, v in r.items() if not isinstance(v, list)}
            print(name, json.dumps(shown), flush=True)
    summary = {k: summarise(v) for k, v in results.items()}
    budget = "quick" if args.quick else "full"
    (args.out / f"cylinder_{budget}.json").write_text(
        json.dumps({"runs": results, "summary": summary}, indent=1)
    )
    if 0 in args.seeds:
        figure(results, args.out / f"cylinder_surface_{budget}.png")
    print("\n| model | mean abs u.n at surface | rel. L2 | rel. L2 interior | s/step |")
    print("|---|---|---|---|---|")
    for name, s in summary.items():
        cells = [f"{m:.3g} ({e:.2g})" for m, e in s.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
