"""PNG plots of a run directory (matplotlib Agg: no display needed)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_losses(run_dir: Path, out: Path) -> Path | None:
    curves: dict[str, dict[int, float]] = {}
    for rec in read_metrics(run_dir):
        if "step" in rec and "loss" in rec:
            curves.setdefault(rec["phase"], {})[rec["step"]] = rec["loss"]  # a resumed step overwrites
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
    for ax, (phase, points) in zip(axes[0], curves.items(), strict=True):
        steps = sorted(points)
        ax.plot(steps, [points[s] for s in steps])
        ax.set(title=phase, xlabel="step", ylabel="loss")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_norms(norms: dict, targets: list[int], out: Path) -> Path:
    by_layer = {int(k): v for k, v in norms.items()}  # JSON turns the int keys into strings
    layers = sorted(by_layer)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(layers, [by_layer[i] for i in layers], color=["tab:red" if i in targets else "tab:blue" for i in layers])
    ax.set(title="mean difference vector norm per layer (red: phase-3 targets)", xlabel="hidden_states index",
           ylabel="L2 norm")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_accuracy(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4, 3.5))
    values = [result["base"]["accuracy"], result["aligned"]["accuracy"]]
    ax.bar(["base", "aligned"], values, color=["tab:gray", "tab:green"])
    ax.set(ylim=(0, 1), ylabel="preference accuracy", title=f"{result['pairs']} held-out pairs")
    for i, v in enumerate(values):
        ax.text(i, v + 0.02, f"{v:.2f}", ha="center")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
