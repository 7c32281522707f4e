"""Preference accuracy and generation health of phase-1 adapters alone, on validation rows.

    python benchmarks/phase1_health.py runs/dual-all/phase1/good runs/dual-s80/phase1/good \\
        --config runs/dual-all/config.yaml --val-rows 1207:1307 --health-prompts 16

The same scoring as `benchmarks/sweep_rahf.py` (its `Scorer`: per-pair margins, and distinct-2, length
and base log-likelihood of the greedy answers to the first validation prompts), for any PEFT adapter
folder, so phase 1 can be compared with the full RAHF points of a sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sweep_rahf import Scorer  # noqa: E402

from training.config import load_config  # noqa: E402
from training.data import load_preferences  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("adapters", nargs="+", help="PEFT adapter folders (or bundles)")
    ap.add_argument("--config", required=True, help="the run's config.yaml (its eval cuts)")
    ap.add_argument("--data", default="../shared/data/hh_harmless/train.jsonl")
    ap.add_argument("--val-rows", default="1207:1307")
    ap.add_argument("--health-prompts", type=int, default=16)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    args = ap.parse_args()
    scorer = Scorer(args.base, "cpu", load_config(args.config), load_preferences(args.data, args.val_rows),
                    args.health_prompts)
    print("| adapter | accuracy | distinct-2 | length | base log-lik |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for path in args.adapters:
        margins, health = scorer(Path(path))
        print(f"| {path} | {float((margins > 0).float().mean()):.3f} | {health['distinct2']:.3f} | "
              f"{health['mean_length']:.1f} | {health['base_loglik']:+.2f} |", flush=True)


if __name__ == "__main__":
    main()
