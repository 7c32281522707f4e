"""Time and peak resident memory of each RAHF phase on the real default model.

    python benchmarks/train_bench.py                       # SCIT, smollm2-scit config, HH rows 0:1207
    python benchmarks/train_bench.py --method dual         # smollm2-dual config, runs/bench-dual

Each phase runs as its own `rahf-train` process (phase1, collect, align, then eval on the first
60 pairs of the HH test file), so the peak RSS reported per phase is that process's own, sampled
every 0.2 s.
Target (SCIT, 2-core CPU): the whole pipeline within 30 minutes, peak RSS within 6 GB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh_harmless"


def measure(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB of the process and its children) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = handle.memory_info().rss + sum(c.memory_info().rss for c in handle.children(recursive=True))
            peak = max(peak, rss)
        except psutil.NoSuchProcess:
            pass
        time.sleep(0.2)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, peak / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--data", default=str(DATA / "train.jsonl"))
    parser.add_argument("--method", default="scit", choices=["scit", "dual", "lorra"])
    parser.add_argument("--config", help="default: smollm2-METHOD")
    parser.add_argument("--rows", default="0:1207")
    parser.add_argument("--eval-data", default=str(DATA / "test.jsonl"))
    parser.add_argument("--eval-rows", default="0:60")
    parser.add_argument("--out", type=Path, help="default: runs/bench-METHOD")
    args = parser.parse_args()
    args.config = args.config or f"smollm2-{args.method}"
    args.out = args.out or Path(f"runs/bench-{args.method}")
    if args.out.exists():
        shutil.rmtree(args.out)
    train = [sys.executable, "-m", "training.cli"]
    common = ["--out", str(args.out), "--base", args.base, "--data", args.data, "--rows", args.rows,
              "--method", args.method, "--config", args.config]
    steps = [(phase, [*train, phase, *common]) for phase in ("phase1", "collect", "align")]
    steps.append(("eval", [*train, "eval", "--adapter", f"aligned={args.out / 'bundle'}", "--base", args.base,
                           "--data", args.eval_data, "--rows", args.eval_rows, "--config", args.config,
                           "--out", str(args.out / "eval")]))
    rows = []
    for phase, cmd in steps:
        seconds, peak = measure(cmd)
        rows.append({"phase": phase, "seconds": round(seconds, 1), "peak_rss_gb": round(peak, 2)})
        print(json.dumps(rows[-1]), flush=True)
    train_s = sum(r["seconds"] for r in rows if r["phase"] != "eval")
    scores = json.loads((args.out / "eval" / "eval.json").read_text())["preference"]["scores"]
    base, aligned = scores["base"], scores["aligned"]
    print("\n| phase | time | peak RSS |\n| --- | --- | --- |")
    for r in rows:
        print(f"| {r['phase']} | {r['seconds'] / 60:.1f} min | {r['peak_rss_gb']:.2f} GB |")
    print(f"| train total (phase1+collect+align) | {train_s / 60:.1f} min | "
          f"{max(r['peak_rss_gb'] for r in rows):.2f} GB |")
    print(f"| all, with eval | {sum(r['seconds'] for r in rows) / 60:.1f} min | |")
    print(f"\npreference accuracy on rows {args.eval_rows} of {args.eval_data}: base {base['accuracy']:.3f} "
          f"(margin {base['margin']:+.4f}), aligned {aligned['accuracy']:.3f} (margin {aligned['margin']:+.4f})")
    (args.out / "bench.json").write_text(json.dumps({"phases": rows, "base": base, "aligned": aligned}, indent=2))


if __name__ == "__main__":
    main()
