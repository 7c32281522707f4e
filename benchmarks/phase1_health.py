"""Preference accuracy and generation health of phase-1 adapters alone, on validation rows.

    python benchmarks/phase1_health.py runs/dual-all/phase1/good runs/dual-s80/phase1/good \\
        --config runs/dual-all/config.yaml --val-rows 1207:1307 --health-prompts 16
    python benchmarks/phase1_health.py --snapshots runs/dual-snap --adapter good \\
        --val-rows 1207:1307 --health-prompts 16 --out docs/results/hh-val-round4/phase1

The same scoring as `benchmarks/sweep_rahf.py` (its `Scorer`: per-pair margins, and distinct-2, length
and base log-likelihood of the greedy answers to the first validation prompts), for any PEFT adapter
folder, so phase 1 can be compared with the full RAHF points of a sweep. With `--snapshots RUN`, every
snapshot of `--adapter` that RUN saved (`--phase1.snapshot_every`) is scored in step order, so how
long phase 1 trains can be chosen on accuracy and health together (then `rahf-train pick-phase1`).
With `--out`, one JSON line per model goes to OUT/phase1.jsonl as it finishes (a re-run skips what
is there), and OUT/phase1.md and OUT/phase1.png show them all against the base.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep_rahf import Scorer  # noqa: E402

from rahf_serve.bundle import DEFAULT_MAX_RANK  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import load_preferences  # noqa: E402
from training.phase1 import snapshot_steps  # noqa: E402
from training.rundir import RunDir  # noqa: E402
from training.stats import describe  # noqa: E402

BASE = "base"


def models(args: argparse.Namespace) -> list[tuple[str, Path | None]]:
    """(name, adapter folder) to score, the base (None) first."""
    out: list[tuple[str, Path | None]] = [(BASE, None)] + [(str(p), Path(p)) for p in args.adapters]
    if args.snapshots:
        run = RunDir(args.snapshots)
        steps = snapshot_steps(run, args.adapter)
        if not steps:
            raise SystemExit(f"{args.snapshots} has no snapshots of {args.adapter!r} (train with --phase1.snapshot_every)")
        out += [(f"{args.adapter}@{s}", run.snapshot(args.adapter, s)) for s in steps]
    return out


def row(name: str, margins, health: dict) -> dict:
    s = describe(margins)
    return {"name": name, "accuracy": s["accuracy"], "accuracy_ci": s["accuracy_ci"],
            **{k: health[k] for k in ("distinct2", "mean_length", "base_loglik", "answers")}}


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | accuracy [95% CI] | distinct-2 | length | base log-lik |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lo, hi = r["accuracy_ci"]
        lines.append(f"| {r['name']} | {r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] | {r['distinct2']:.3f} | "
                     f"{r['mean_length']:.1f} | {r['base_loglik']:+.2f} |")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy (left) and distinct-2 (right) per model, the base as a dashed line; the right panel
    also marks 90% of the base's distinct-2 (the health target's bound)."""
    base, others = rows[0], rows[1:]
    names = [r["name"] for r in others]
    fig, (acc_ax, d2_ax) = plt.subplots(1, 2, figsize=(11, 0.35 * len(others) + 1.8), sharey=True)
    acc = [r["accuracy"] for r in others]
    err = [[a - r["accuracy_ci"][0] for a, r in zip(acc, others, strict=True)],
           [r["accuracy_ci"][1] - a for a, r in zip(acc, others, strict=True)]]
    acc_ax.errorbar(acc, names, xerr=err, fmt="o", capsize=3)
    acc_ax.axvline(base["accuracy"], color="k", ls="--", label=f"base {base['accuracy']:.3f}")
    acc_ax.set(xlabel="preference accuracy (validation rows)", title="accuracy, 95% CI")
    acc_ax.legend(loc="lower right", fontsize=8)
    d2_ax.plot([r["distinct2"] for r in others], names, "o")
    d2_ax.axvline(base["distinct2"], color="k", ls="--", label=f"base {base['distinct2']:.3f}")
    d2_ax.axvline(0.9 * base["distinct2"], color="r", ls=":", label="90% of base")
    d2_ax.set(xlabel="distinct-2 of greedy answers", title="generation health")
    d2_ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", nargs="*", help="PEFT adapter folders (or bundles)")
    ap.add_argument("--snapshots", type=Path, metavar="RUN", help="score every phase-1 snapshot of --adapter in RUN")
    ap.add_argument("--adapter", default="good", help="the phase-1 adapter whose snapshots are scored (default good)")
    ap.add_argument("--config", help="config.yaml whose eval cuts apply (default: the --snapshots run's)")
    ap.add_argument("--data", default="../shared/data/hh_harmless/train.jsonl")
    ap.add_argument("--val-rows", default="1207:1307")
    ap.add_argument("--health-prompts", type=int, default=16)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--out", type=Path, help="folder for phase1.jsonl, phase1.md and phase1.png")
    ap.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK,
                    help="rank limit of the folders read (full_ft_probe.py's exact LoRAs have rank 576 on SmolLM2)")
    args = ap.parse_args()
    config = args.config or (RunDir(args.snapshots).config_file if args.snapshots else None)
    if config is None:
        ap.error("give --config (or --snapshots, whose config is used)")
    scorer = Scorer(args.base, "cpu", load_config(config), load_preferences(args.data, args.val_rows),
                    args.health_prompts, max_rank=args.max_rank)
    log = args.out / "phase1.jsonl" if args.out else None
    done = {r["name"]: r for r in map(json.loads, log.read_text().splitlines())} if log and log.exists() else {}
    # Listed again after each model: a run still training saves snapshots while earlier ones are scored.
    while todo := [(name, path) for name, path in models(args) if name not in done]:
        name, path = todo[0]
        margins, health = scorer(path)
        done[name] = row(name, margins, health)
        if log:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as fh:
                fh.write(json.dumps(done[name]) + "\n")
        print(table([done[name]])[-1], flush=True)
    rows = [done[name] for name, _ in models(args)]
    text = "\n".join(table(rows)) + "\n"
    print(text, flush=True)
    if args.out:
        (args.out / "phase1.md").write_text(text)
        plot(rows, args.out / "phase1.png")


if __name__ == "__main__":
    main()
