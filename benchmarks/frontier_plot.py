"""Accuracy against generation health of every candidate scored on the same validation rows.

    python benchmarks/frontier_plot.py docs/results/hh-val-round5/phase1.jsonl \\
        docs/results/hh-val-round6/sweep.jsonl docs/results/hh-val-round7/sweep.jsonl \\
        docs/results/hh-val-round8/sweep.jsonl docs/results/hh-val-round9/phase1.jsonl \\
        docs/results/hh-val-round9/sweep.jsonl docs/results/hh-val-baselines/phase1.jsonl \\
        --out docs/results/hh-val-frontier.png

Reads `phase1_health.py` lines (name, accuracy, distinct2) and `sweep_rahf.py` lines (name, aligned
accuracy, health distinct2; the base from the first sweep line); all must share validation rows and
health prompts. The bound drawn is the health target (90% of the base's distinct-2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib.pyplot as plt


def points(path: Path) -> tuple[str, list[tuple[str, float, float]]]:
    """(the folder's name and what the file holds, [(label, accuracy, distinct-2)]) from one results file; the base is labelled "base"."""
    out = []
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "aligned" in r:  # a sweep point
            if not any(label == "base" for label, *_ in out):
                out.append(("base", r["base"]["accuracy"], None))
            out.append((r["name"], r["aligned"]["accuracy"], r["health"]["distinct2"]))
        else:
            out.append((r["name"], r["accuracy"], r["distinct2"]))
    kind = " (phase-3 sweep)" if path.name == "sweep.jsonl" else " (adapters as trained)"  # a round may have both
    return path.parent.name + kind, [p for p in out if p[2] is not None]


def short(label: str) -> str:
    """A point's name, short enough to print beside it."""
    if "rahf-dual" in label:
        return "shipped Dual"
    if "dpo" in label:
        return "DPO"
    if "/" in label:  # a phase-1 adapter folder: which run, which step
        folders = label.split("/")
        run = next((part for part in folders if part.startswith(("dual-", "full-"))), "")
        if "@" in folders[-1]:  # full_ft_probe.py names its snapshots adapter@step
            return f"{run} {folders[-1]}"
        step = label.rsplit("step-", 1)[-1].lstrip("0") if "step-" in label else "last"
        return f"{run} good@{step}"
    parts = label.split("_")  # a sweep point: alpha and KL weight
    return " ".join([parts[0]] + [x for x in parts[1:] if x.startswith("kl")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(11, 6))
    base = None
    for color, path in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], args.files, strict=False):
        group, rows = points(path)
        rows = [r for r in rows if r[0] != "base" or (base := (r[1], r[2])) is None]
        ax.scatter([d2 for _, _, d2 in rows], [acc for _, acc, _ in rows], s=25, color=color, label=group)
        for label, acc, d2 in rows:
            ax.annotate(short(label), (d2, acc), fontsize=6, xytext=(3, 2), textcoords="offset points")
    if base:
        ax.scatter(base[1], base[0], marker="*", s=140, color="k", label=f"base ({base[0]:.3f}, {base[1]:.3f})")
        ax.axvline(0.9 * base[1], color="k", ls=":", label="health target: 90% of the base's distinct-2")
        ax.axhline(base[0] + 0.10, color="r", ls=":", label="accuracy target: base + 10 points")
    ax.set(xlabel="distinct-2 of greedy answers (first 48 validation prompts)",
           ylabel="preference accuracy (validation rows 1207:1307, 99 pairs)",
           title="Every candidate on the same validation rows: accuracy against fluency")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: points fill every corner
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(args.out)


if __name__ == "__main__":
    main()
