"""Quickstart: an FNO leaks heat through an insulated wall; one `wrap` call stops it.

Heat equation u_t = k u_xx on [0, 1] (k = 0.01) with an insulated wall at x = 0 (du/dn = 0) and a
heater at x = 1 (du/dx = U sin(pi t), U = 5), initial condition cos(omega pi x). The data come from
the library's exact cosine-series solver (`cl.problems.Heat`). We train a small FNO for about a
minute to map u(0, .) to u(0.5, .), wrap it with the two Neumann conditions, and compare.

    make demo            # or: .venv/bin/python examples/quickstart.py [--seconds 60]

Prints a table (relative L2 error and wall-flux error at each wall, FNO vs wrapped) and saves the
figure "Insulator at boundary" to out/quickstart_heat.png.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import torch

import constraint_layers as cl

U = 5.0
T_END = 0.5


def make_data(n_train: int, n_test: int, resolution: int, seed: int):
    """Single-step heat data: x = (u0, coordinate) channels, y = u(0.5, .)."""
    data = cl.problems.Heat(flux_amplitude=U, t_final=T_END).generate(
        n_train + n_test, task="single", resolution=resolution, coords=True, seed=seed, cache=False
    )
    x, y = data.x.float(), data.y.float()
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def train(
    model, train_set, epochs: int, batch: int = 20, seed: int = 0, seconds: float | None = None
) -> tuple[int, float]:
    """Adam with relative-L2 loss for ``epochs`` epochs, or until ``seconds`` have passed;
    returns (epochs done, seconds spent)."""
    from tqdm.auto import tqdm

    x, y = train_set
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, epochs // 3), gamma=0.5)
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc="training FNO", unit="epoch")
    done = 0
    for _ in bar:
        if seconds is not None and time.perf_counter() - start > seconds:
            break
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            loss = cl.metrics.relative_l2(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        sched.step()
        done += 1
        bar.set_postfix(rel_l2=f"{loss.item():.3f}")
    bar.close()
    return done, time.perf_counter() - start


def wall_flux_error(y, bcs) -> list[float]:
    """Mean over test samples of |du/dn - prescribed| at each wall (the conditions' stencil)."""
    res = cl.functional.boundary_residuals(y, bcs)
    return [float(parts[0].abs().mean()) for parts in res]


def figure(x, truth, plain, wrapped, bcs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = x[0, 1]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    # the test sample where the FNO leaks most through the insulated wall
    i = int(cl.functional.boundary_residuals(plain, bcs)[0][0][:, 0].abs().argmax())
    for ax, sl, title in (
        (axes[0], slice(0, 6), "insulated wall x = 0"),
        (axes[1], slice(-6, None), "heater x = 1"),
    ):
        ax.plot(grid[sl], truth[i, 0, sl], "k-", lw=2, label="truth")
        ax.plot(grid[sl], plain[i, 0, sl], "C3--o", ms=4, label="FNO")
        ax.plot(grid[sl], wrapped[i, 0, sl], "C0-s", ms=4, label="FNO + cl.wrap")
        ax.set_title(f"sample {i}: profile at the {title}")
        ax.set_xlabel("x")
    axes[0].legend()
    h = float(grid[1] - grid[0])
    for y, style, label in ((plain, "C3o", "FNO"), (wrapped, "C0s", "FNO + cl.wrap")):
        flux = [float(v) for v in cl.functional.boundary_residuals(y, bcs)[1][0][:, 0]]
        axes[2].plot(flux, style, ms=3, label=f"{label} at x = 1")
        flux0 = cl.functional.boundary_residuals(y, bcs)[0][0][:, 0]
        axes[2].plot(flux0.tolist(), style, ms=3, mfc="none", label=f"{label} at x = 0")
    axes[2].axhline(0, color="k", lw=1)
    axes[2].set_title(f"wall flux error du/dn - g (h = {h:.4f})")
    axes[2].set_xlabel("test sample")
    axes[2].legend(fontsize=7)
    fig.suptitle("Insulator at boundary: heat equation, u(0.5, x)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=150, help="at most this many epochs")
    ap.add_argument("--seconds", type=float, default=60.0, help="training time budget")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    warnings.filterwarnings("ignore", module="neuralop")
    torch.manual_seed(0)
    from neuralop.models import FNO

    train_set, (x_test, y_test) = make_data(args.n_train, 100, args.resolution, seed=0)
    fno = FNO(n_modes=(16,), in_channels=2, out_channels=1, hidden_channels=32)
    epochs, seconds = train(fno, train_set, args.epochs, seconds=args.seconds)

    # the one call: insulated wall (outward flux 0) and heater (du/dx = U sin(pi t) at t = 0.5)
    bcs = [cl.Neumann(0.0, side="low"), cl.Neumann(U * math.sin(math.pi * T_END), side="high")]
    model = cl.wrap(fno, *bcs)

    with torch.no_grad():
        plain, wrapped = fno(x_test), model(x_test)
    rows = [
        ("FNO", plain),
        ("FNO + cl.wrap", wrapped),
        ("truth (same stencil)", y_test),
    ]
    print(f"\ntrained {epochs} epochs in {seconds:.0f} s; test set of {len(x_test)} samples")
    print(f"{'model':22s} {'relative L2':>12s} {'flux err x=0':>13s} {'flux err x=1':>13s}")
    for name, y in rows:
        l2 = float(cl.metrics.relative_l2(y, y_test))
        e0, e1 = wall_flux_error(y, bcs)
        print(f"{name:22s} {l2:12.4f} {e0:13.2e} {e1:13.2e}")
    print(
        "\n(the truth's own one-sided stencil is not exactly its derivative: its 'flux error' is\n"
        " the discretisation error of the stencil at this resolution)"
    )
    path = args.out / "quickstart_heat.png"
    figure(x_test, y_test, plain, wrapped, bcs, path)
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
