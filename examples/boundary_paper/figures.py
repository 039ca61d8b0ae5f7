"""Figures like the boundary paper's (matplotlib, Agg backend, PNG files).

Each function takes the task, its results, the seed-0 test predictions of every model and the
output folder, and returns the names of the files it wrote. Sample 0 of the test set is shown.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

STYLE = {
    "truth": {"color": "black", "lw": 2.0, "ls": "-", "label": "truth"},
    "fno": {"color": "tab:red", "lw": 1.4, "ls": "--", "label": "FNO"},
    "output": {"color": "tab:green", "lw": 1.4, "ls": "-.", "label": "FNO + output step"},
    "refine": {"color": "tab:blue", "lw": 1.4, "ls": ":", "label": "FNO + refine (ours)"},
    "scalar_pivot": {"color": "tab:purple", "lw": 1.0, "ls": (0, (1, 2)), "label": "scalar pivots"},
    "refine_frozen": {"color": "tab:orange", "lw": 1.2, "ls": "-", "label": "refine, frozen probe"},
}


def _style(kind: str) -> dict:
    return dict(STYLE[kind])


def _save(fig, out_dir: Path, name: str) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=110)
    plt.close(fig)
    return name


def one_sided_slope(u: torch.Tensor, h: float, side: str) -> torch.Tensor:
    """du/dx at one end of the first axis of ``u`` (second-order one-sided stencil)."""
    if side == "low":
        return (-1.5 * u[0] + 2.0 * u[1] - 0.5 * u[2]) / h
    return (1.5 * u[-1] - 2.0 * u[-2] + 0.5 * u[-3]) / h


def relative_l2_over_time(ax, task, results) -> None:
    t = task.test.coords["t"].numpy()
    for kind, r in results["models"].items():
        if "rel_l2_per_frame_mean" in r:
            ax.semilogy(t, r["rel_l2_per_frame_mean"], **_style(kind))
    ax.set_xlabel("t")
    ax.set_ylabel("relative L2 (mean over seeds)")
    ax.set_title("relative L2 over time")
    ax.legend(fontsize=7)


# ------------------------------------------------------------------------------------ heat
def heat(task, results, preds, out_dir: Path) -> list[str]:
    """ "Insulator at boundary": profiles next to both walls and the wall gradients over time."""
    x = task.test.coords["x"].numpy()
    h = float(x[1] - x[0])
    true = task.test.y[0, 0]
    kinds = [k for k in ("fno", "output", "refine") if k in preds]
    near = max(3, int(0.15 * (len(x) - 1)))
    frames = true.ndim == 2
    fig, axes = plt.subplots(2 if frames else 1, 2, figsize=(10, 7 if frames else 3.6))
    axes = axes.reshape(-1)

    def last(u):
        return u[:, -1] if frames else u

    tlabel = f"t = {float(task.test.coords['t'][-1]):.2f}" if frames else "t = 0.5"
    for ax, sl, title in (
        (axes[0], slice(0, near + 1), "insulated wall (du/dx = 0 at x = 0)"),
        (axes[1], slice(len(x) - near - 1, len(x)), "heater (du/dx = U sin(pi t) at x = 1)"),
    ):
        ax.plot(x[sl], last(true)[sl].numpy(), **_style("truth"))
        for kind in kinds:
            ax.plot(x[sl], last(preds[kind][0, 0])[sl].numpy(), marker=".", ms=3, **_style(kind))
        ax.set_title(f"{title}, {tlabel}", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylabel("u")
        ax.legend(fontsize=7)
    if frames:
        t = task.test.coords["t"].numpy()
        exact = {"low": torch.zeros(len(t)), "high": task.test.boundary["x_high"][0, 0]}
        for ax, side, title in (
            (axes[2], "low", "du/dx at the insulated wall x = 0"),
            (axes[3], "high", "du/dx at the heater x = 1"),
        ):
            ax.plot(t, exact[side].numpy(), **_style("truth") | {"label": "prescribed"})
            for kind in kinds:
                ax.plot(
                    t,
                    one_sided_slope(preds[kind][0, 0], h, side).numpy(),
                    marker=".",
                    **_style(kind),
                )
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("t")
            ax.set_ylabel("du/dx (2nd-order one-sided)")
            ax.legend(fontsize=7)
    fig.suptitle(f"Insulator at boundary ({task.title})")
    return [_save(fig, out_dir, f"{task.name}_insulator.png")]


# ---------------------------------------------------------------------------------- stokes
def stokes(task, results, preds, out_dir: Path) -> list[str]:
    """ "Stokes's second problem": velocity profiles and absolute errors over time."""
    x = task.test.coords["x"].numpy()
    t = task.test.coords["t"].numpy()
    true = task.test.y[0, 0]  # (x, t)
    kinds = [k for k in ("fno", "output", "refine", "scalar_pivot") if k in preds]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    ax = axes[0, 0]
    for j, frame in enumerate((len(t) // 5, len(t) // 2, len(t) - 1)):
        alpha = 0.45 + 0.25 * j
        ax.plot(x, true[:, frame].numpy(), alpha=alpha, **_style("truth"))
        for kind in ("fno", "refine"):
            if kind in preds:
                ax.plot(x, preds[kind][0, 0, :, frame].numpy(), alpha=alpha, **_style(kind))
        ax.annotate(f"t={t[frame]:.2f}", (x[0], float(true[0, frame])), fontsize=7)
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[:3], labels[:3], fontsize=7)
    ax.set_title("velocity profiles u(x) at three times", fontsize=9)
    ax.set_xlabel("x")
    ax.set_ylabel("u")
    ax = axes[0, 1]
    for kind in kinds:
        err = (preds[kind][:, 0, 0, :] - task.test.y[:, 0, 0, :]).abs().mean(0)
        ax.semilogy(t, err.clamp_min(1e-12).numpy(), marker=".", **_style(kind))
    ax.set_title("|u - u_true| at the plate x = 0 (mean over test), floor 1e-12", fontsize=9)
    ax.set_xlabel("t")
    ax = axes[1, 0]
    for kind in kinds:
        err = (preds[kind][:, 0] - task.test.y[:, 0]).abs().mean(dim=(0, 1))
        ax.semilogy(t, err.numpy(), marker=".", **_style(kind))
    ax.set_title("mean |u - u_true| over x and test samples", fontsize=9)
    ax.set_xlabel("t")
    ax.legend(fontsize=7)
    relative_l2_over_time(axes[1, 1], task, results)
    fig.suptitle(f"Stokes's second problem ({task.title})")
    return [_save(fig, out_dir, f"{task.name}_stokes.png")]


# --------------------------------------------------------------------------------- generic
def frames_error(task, results, preds, out_dir: Path) -> list[str]:
    """Relative L2 over time (multi-frame tasks) and the final-frame profile of sample 0."""
    x = task.test.coords["x"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    true = task.test.y[0, 0]
    frames = true.ndim == 2
    last = (lambda u: u[:, -1]) if frames else (lambda u: u)
    axes[0].plot(x, last(true).numpy(), **_style("truth"))
    for kind, pred in preds.items():
        axes[0].plot(x, last(pred[0, 0]).numpy(), **_style(kind))
    axes[0].set_title("sample 0, last frame", fontsize=9)
    axes[0].set_xlabel("x")
    axes[0].legend(fontsize=7)
    if frames:
        relative_l2_over_time(axes[1], task, results)
    else:
        for kind, pred in preds.items():
            axes[1].semilogy(x, (pred[0, 0] - true).abs().clamp_min(1e-12).numpy(), **_style(kind))
        axes[1].set_title("|error| of sample 0 (floor 1e-12)", fontsize=9)
        axes[1].set_xlabel("x")
    fig.suptitle(task.title)
    return [_save(fig, out_dir, f"{task.name}_error.png")]


# ---------------------------------------------------------------------------------- cavity
def cavity(task, results, preds, out_dir: Path) -> list[str]:
    """Lid-driven cavity: vorticity of the last frame and the relative L2 over time."""
    true = task.test.y[0, 0, :, :, -1]
    kinds = [k for k in ("fno", "refine") if k in preds]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7))
    lim = float(true.abs().quantile(0.98))
    panels = [("truth", true)] + [(k, preds[k][0, 0, :, :, -1]) for k in kinds]
    for ax, (name, w) in zip(axes[0], panels):
        im = ax.imshow(w.T.numpy(), origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_title(f"vorticity, {_style(name)['label']}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    errs = [(k, (preds[k][0, 0, :, :, -1] - true).abs()) for k in kinds]
    elim = max(float(e.max()) for _, e in errs) if errs else 1.0
    for ax, (name, e) in zip(axes[1], errs):
        im = ax.imshow(e.T.numpy(), origin="lower", cmap="magma", vmin=0, vmax=elim)
        ax.set_title(f"|error|, {_style(name)['label']}", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    relative_l2_over_time(axes[1, 2], task, results)
    fig.suptitle(f"Lid-driven cavity, t = {float(task.test.coords['t'][-1]):.2f} ({task.title})")
    return [_save(fig, out_dir, f"{task.name}_cavity.png")]
