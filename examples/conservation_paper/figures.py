"""The paper's figures from the measured results (matplotlib, Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

__all__ = ["mass_figure", "noise_figure", "shock_figure", "uncertainty_figure"]

COLORS = {
    "ANP": "tab:orange",
    "SoftC-ANP": "tab:green",
    "HardC-ANP": "tab:purple",
    "ProbConserv-ANP": "tab:blue",
    "GP": "tab:orange",
    "ProbConserv-GP": "tab:blue",
    "Ensemble": "tab:orange",
    "ProbConserv-Ensemble": "tab:blue",
}


def mass_figure(curves: dict[str, dict], path: Path) -> None:
    """ "Conservation of mass": total mass over time, one panel per problem."""
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (label, c) in zip(axes[0], curves.items()):
        t = c["t"]
        for name in ("ANP", "SoftC-ANP", "ProbConserv-ANP"):
            m = c[name]["mean"]
            ax.plot(t, m, color=COLORS[name], label=name)
            if c[name]["std"] is not None:
                lo = [a - 2 * s for a, s in zip(m, c[name]["std"])]
                hi = [a + 2 * s for a, s in zip(m, c[name]["std"])]
                ax.fill_between(t, lo, hi, color=COLORS[name], alpha=0.15)
        ax.plot(t, c["truth"], "k--", label="truth")
        ax.set(title=f"Conservation of mass: {label}", xlabel="t", ylabel=r"$\int u\,dx$")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def uncertainty_figure(
    x: torch.Tensor, truth: torch.Tensor, first: dict, rows: list[list[str]], title: str, path
) -> None:
    """ "Uncertainty quantification": mean and 2 standard deviations at t*, against the truth."""
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(3.6 * ncol, 3.0 * len(rows)), squeeze=False)
    for r, names in enumerate(rows):
        for c in range(ncol):
            ax = axes[r][c]
            if c >= len(names):
                ax.axis("off")
                continue
            name = names[c]
            m, v = first[name]
            s = v.sqrt()
            color = COLORS.get(name, "tab:blue")
            ax.plot(x, m, color=color, label=name)
            ax.fill_between(x, m - 2 * s, m + 2 * s, color=color, alpha=0.25)
            ax.plot(x, truth, "k--", lw=1, label="truth")
            ax.set(title=name, xlabel="x", ylim=(-0.3, 1.2))
            ax.legend(fontsize=7)
    fig.suptitle(f"Uncertainty quantification: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def shock_figure(shocks: dict[str, dict], names: list[str], path: Path) -> None:
    """ "Shock position": histograms of the posterior front position, one row per case."""
    fig, axes = plt.subplots(
        len(shocks), len(names), figsize=(3.2 * len(names), 2.4 * len(shocks)), squeeze=False
    )
    for r, (label, sh) in enumerate(shocks.items()):
        for c, name in enumerate(names):
            ax = axes[r][c]
            pos = [p for p in sh[name]["positions"] if not math.isnan(p)]
            ax.hist(pos, bins=30, color=COLORS.get(name, "tab:blue"), alpha=0.8)
            ax.axvline(sh["true_front"], color="k", ls="--", lw=1)
            ax.set_title(f"{name}\n{label}", fontsize=8)
            ax.set_xlabel("shock position x", fontsize=8)
    fig.suptitle("Shock position (dashed: true front)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def noise_figure(sweeps: dict[str, dict], path: Path) -> None:
    """Limiting behaviour: metrics against the constraint noise ``sigma_G``."""
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for label, sw in sweeps.items():
        noise = sw["noise"]
        finite = [i for i, s in enumerate(noise) if 0 < s < math.inf]
        xs = [noise[i] for i in finite]
        for ax, key in zip(axes, ("CE", "MSE", "LL")):

            def val(v, key=key):  # |CE| on a log axis, floored at 1e-18
                return max(abs(v), 1e-18) if key == "CE" else v

            (line,) = ax.plot(xs, [val(sw[key][i][0]) for i in finite], "o-", label=label)
            ax.axhline(val(sw[key][0][0]), color=line.get_color(), ls=":", lw=1)
            ax.axhline(val(sw[key][-1][0]), color=line.get_color(), ls="--", lw=1)
    for ax, key in zip(axes, ("|CE| (floored at 1e-18)", "MSE", "LL")):
        ax.set(xscale="log", xlabel=r"constraint noise $\sigma_G$", title=key)
        if key != "LL":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Limiting behaviour of ProbConserv-ANP (dotted: noise 0 = ProbConserv; dashed: "
        "noise = inf = ANP)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
