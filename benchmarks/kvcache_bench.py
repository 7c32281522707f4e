"""Decode-step time of the slot KV cache against today's left-padded KVBatch, on the real default model.

    OMP_NUM_THREADS=1 python benchmarks/kvcache_bench.py            # contexts 256/1000/2000, 1 and 8 rows
    python benchmarks/kvcache_bench.py --contexts 2000 --rows 8 --runs 7

Both caches start filled with `context` tokens per row (zeros: speed does not depend on the values, and a
real prefill of 8 x 2000 tokens would dominate the run), then decode `--steps` tokens. A and B alternate
within every run; each cell is the median over runs of the mean step time. Also times one row leaving
the middle of the batch: KVBatch.keep copies the whole cache, SlotCache.remove moves one row.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvbatch_baseline import KVBatch  # noqa: E402

from rahf_serve.kvcache import KVShape, SlotCache  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402


def kvbatch(model, shape: KVShape, rows: int, context: int) -> KVBatch:
    cache = DynamicCache(config=model.config)
    for layer in range(shape.layers):
        kv = torch.zeros(rows, shape.kv_heads, context, shape.head_dim)
        cache.update(kv, kv.clone(), layer)
    return KVBatch(cache, torch.ones(rows, context, dtype=torch.long))


def slots(model, rows: int, context: int, steps: int) -> SlotCache:
    cache = SlotCache.for_model(model, rows, context + steps)
    cache.add(rows)
    cache.begin_step([context] * rows)  # counts `context` (zero) tokens into every row without a forward
    cache.end_step()
    return cache


def decode_kvbatch(model, kv: KVBatch, steps: int) -> float:
    ids = torch.ones(kv.rows, 1, dtype=torch.long)
    start = time.perf_counter()
    for _ in range(steps):
        mask = kv.grow()
        positions = torch.full((kv.rows, 1), mask.shape[1] - 1)
        model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=kv.cache, use_cache=True,
              logits_to_keep=1)
    return (time.perf_counter() - start) / steps


def decode_slots(model, cache: SlotCache, steps: int) -> float:
    ids = torch.ones(1, cache.rows, dtype=torch.long)  # one packed token per row
    start = time.perf_counter()
    for _ in range(steps):
        step = cache.begin_step([1] * cache.rows)
        with cache.attending(model):
            model(input_ids=ids, attention_mask=step.attention_mask, position_ids=step.position_ids, cache=cache,
                  use_cache=True, logits_to_keep=step.logits_to_keep)
        cache.end_step()
    return (time.perf_counter() - start) / steps


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1000, 2000])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=4, help="decode steps per run")
    ap.add_argument("--runs", type=int, default=5, help="runs per cell (the median is reported)")
    args = ap.parse_args()

    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    model, shape = base.model, KVShape.of(base.model.config)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    print(f"# {cpu}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); {base.name} float32 CPU")
    print(f"# {args.steps} decode steps per run, median of {args.runs} runs, A/B alternating\n")
    print(f"{'context':>7} {'rows':>4} {'KVBatch ms/step':>16} {'SlotCache ms/step':>18} {'speed-up':>8}")
    with torch.inference_mode():
        decode_slots(model, slots(model, 1, 16, 1), 1)  # warm-up
        for context in args.contexts:
            for rows in args.rows:
                a, b = [], []
                for run in range(args.runs):
                    kv, cache = kvbatch(model, shape, rows, context), slots(model, rows, context, args.steps)
                    pair = [lambda: a.append(decode_kvbatch(model, kv, args.steps)),  # noqa: B023
                            lambda: b.append(decode_slots(model, cache, args.steps))]  # noqa: B023
                    for fn in pair if run % 2 == 0 else pair[::-1]:
                        fn()
                    del kv, cache
                ma, mb = statistics.median(a) * 1e3, statistics.median(b) * 1e3
                print(f"{context:>7} {rows:>4} {ma:>16.1f} {mb:>18.1f} {ma / mb:>7.2f}x")

        rows, context = max(args.rows), max(args.contexts)
        if rows > 1:
            keep, remove = [], []
            for _ in range(args.runs):
                kv, cache = kvbatch(model, shape, rows, context), slots(model, rows, context, 0)
                keep.append(timed(lambda: kv.keep([i for i in range(rows) if i != 1])))  # noqa: B023
                remove.append(timed(lambda: cache.remove([1])))  # noqa: B023
            mk, mr = statistics.median(keep) * 1e3, statistics.median(remove) * 1e3
            print(f"\nrow 1 of {rows} leaves at context {context}: KVBatch.keep {mk:.1f} ms, "
                  f"SlotCache.remove {mr:.2f} ms ({mk / mr:.0f}x)")


if __name__ == "__main__":
    main()
