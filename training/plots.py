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


def plot_validation(run_dir: Path, out: Path) -> Path | None:
    """Phase-1 validation separation and accuracy against the step, one line per trained model."""
    curves: dict[str, list[tuple[int, float, float]]] = {}
    for rec in read_metrics(run_dir):
        if "val_step" in rec:
            curves.setdefault(rec["phase"], []).append((rec["val_step"], rec["separation"], rec["accuracy"]))
    if not curves:
        return None
    fig, (sep, acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for phase, points in curves.items():
        points.sort()
        steps = [p[0] for p in points]
        sep.plot(steps, [p[1] for p in points], marker="o", label=phase)
        acc.plot(steps, [p[2] for p in points], marker="o", label=phase)
    sep.set(title="phase-1 separation (validation)", xlabel="step", ylabel="nats / token")
    acc.set(title="chosen ranked over rejected (validation)", xlabel="step", ylabel="accuracy", ylim=(0, 1))
    sep.legend(fontsize=8)
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
    """Preference accuracy per model with its 95% interval (the base first)."""
    block = result["preference"]
    names = list(block["scores"])
    values = [block["scores"][n]["accuracy"] for n in names]
    errs = [[v - block["scores"][n]["accuracy_ci"][0] for n, v in zip(names, values, strict=True)],
            [block["scores"][n]["accuracy_ci"][1] - v for n, v in zip(names, values, strict=True)]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names), 3.5))
    ax.bar(names, values, yerr=errs, capsize=4, color=["tab:gray"] + ["tab:green"] * (len(names) - 1))
    ax.axhline(values[0], color="tab:gray", lw=0.8, ls="--")
    ax.set(ylim=(0, 1), ylabel="preference accuracy", title=f"{block['pairs']} held-out pairs (95% CI)")
    for i, v in enumerate(values):
        ax.text(i, min(0.95, v + 0.06), f"{v:.3f}", ha="center")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
