"""Decode steps of short rows beside one long-context row: one attention call for all of them, or the
long row in a call of its own (what the slot cache does now), on the real default model.

    OMP_NUM_THREADS=1 python benchmarks/mixed_lengths_bench.py --threads 1 --long 1000 4000 --runs 7

Eight rows hold `--short` tokens and one row `--long` (zeros: speed does not depend on the values);
each run times `--steps` decode steps of the nine rows through the engine's packed forward, once with
every decode row in one call (`kvcache.SPLIT_KEYS` set out of reach: the layout before) and once as the
cache groups them, alternating within every run; also the eight short rows alone, the floor. Cells are
medians over runs of the mean step time.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve import kvcache  # noqa: E402
from rahf_serve.kvcache import SlotCache, pack_inputs  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.packed_llama import PackedLlama  # noqa: E402


def filled(model, lengths: list[int], steps: int) -> SlotCache:
    cache = SlotCache.for_model(model, len(lengths), max(lengths) + steps)
    cache.add(len(lengths))
    cache.begin_step(lengths)  # counts the (zero) tokens into every row without a forward
    cache.end_step()
    return cache


def decode(forward: PackedLlama, cache: SlotCache, steps: int) -> float:
    ids = pack_inputs([[1]] * cache.rows, "cpu")
    start = time.perf_counter()
    for _ in range(steps):
        step = cache.begin_step([1] * cache.rows)
        forward(ids, step, cache, {}, lora=False)
        cache.end_step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long", type=int, nargs="+", default=[1000, 4000], help="context of the long row")
    ap.add_argument("--short", type=int, default=64, help="context of each of the eight short rows")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    forward = PackedLlama(base.model, max(args.long) + args.steps)
    split = kvcache.SPLIT_KEYS
    print(f"mixed lengths: {base.name}, fp32 CPU, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()}")
    print("| long row | 8 short rows alone | + long row, one call | + long row, own call | one call / own call |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    with torch.inference_mode():
        for long in args.long:
            times: dict[str, list[float]] = {"alone": [], "one": [], "own": []}
            for _ in range(args.runs):
                times["alone"].append(decode(forward, filled(base.model, [args.short] * 8, args.steps), args.steps))
                for name, keys in (("one", math.inf), ("own", split)):
                    kvcache.SPLIT_KEYS = keys
                    try:
                        times[name].append(decode(forward, filled(base.model, [args.short] * 8 + [long], args.steps),
                                                  args.steps))
                    finally:
                        kvcache.SPLIT_KEYS = split
            m = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"| {long} | {m['alone']:.1f} ms | {m['one']:.1f} ms | {m['own']:.1f} ms | {m['one'] / m['own']:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
