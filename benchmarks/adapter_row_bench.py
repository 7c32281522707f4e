"""What an adapter row costs against a base row on the engine's own decode path, on the real default model.

    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py            # 8 rows, 7 runs of 5 steps
    python benchmarks/adapter_row_bench.py --rows 1 8 16 --runs 9

The engine's path: a packed decode step (one token per row) through a `SlotCache` with `LoraSlots`,
exactly as `Engine._forward` runs it. The shipped bundles (r16; Dual on every Linear, SCIT on q/k/v/o) are loaded under eight names,
alternating. Layouts per batch size: every row the base, every row one adapter ("same"), row i adapter
i % 8 ("mixed"). The three alternate within every run, so load swings on a shared machine hit them
alike; each cell is the median over runs of the mean step time. Rows start with 256 tokens of context.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.bundle import read_bundle  # noqa: E402
from rahf_serve.kvcache import SlotCache, pack_inputs  # noqa: E402
from rahf_serve.lora_slots import LoraSlots, read_lora  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "adapters" / "smollm2-135m-rahf-dual", ROOT / "adapters" / "smollm2-135m-rahf-scit"]
CONTEXT = 256


def decode(model: torch.nn.Module, cache: SlotCache, slots: LoraSlots, layout: list[int | None], steps: int) -> float:
    """Mean time of `steps` packed decode steps, one token per row, row i on LoRA slot layout[i]."""
    rows = len(layout)
    ids = pack_inputs([[1]] * rows, "cpu")
    start = time.perf_counter()
    for _ in range(steps):
        step = cache.begin_step([1] * rows)
        slots.set_rows(layout, [1] * rows)  # as the engine does, once per step
        with cache.attending(model):
            model(input_ids=ids, attention_mask=step.attention_mask, position_ids=step.position_ids, cache=cache,
                  use_cache=True, logits_to_keep=step.logits_to_keep)
        cache.end_step()
    slots.clear_rows()
    return (time.perf_counter() - start) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    model = load_base("smollm2-135m-instruct", device="cpu", dtype="float32").model.eval()
    slots = LoraSlots(model, max_loras=8, max_rank=16)
    weights = [read_lora(read_bundle(p)) for p in SHIPPED]
    for i in range(8):
        slots.load_weights(f"a{i}", weights[i % 2])
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); SmolLM2-135M "
          f"fp32; packed decode steps at {CONTEXT}+ tokens of context; median of {args.runs} runs x {args.steps} steps")
    print(f"{'rows':>4} {'base ms':>8} {'same ms':>8} {'mixed ms':>9} {'same/base':>9} {'mixed/base':>10}")
    with torch.inference_mode():
        for rows in args.rows:
            cache = SlotCache.for_model(model, rows, CONTEXT + 2 * args.runs * args.steps * 3 + 8)
            cache.add(rows)
            cache.begin_step([CONTEXT] * rows)  # counts CONTEXT (zero) tokens into every row, no forward
            cache.end_step()
            layouts = {"base": [None] * rows, "same": [slots.slot_of("a0")] * rows,
                       "mixed": [slots.slot_of(f"a{i % 8}") for i in range(rows)]}

            for layout in layouts.values():  # warm-up
                decode(model, cache, slots, layout, 1)
            times: dict[str, list[float]] = {k: [] for k in layouts}
            for _ in range(args.runs):
                for kind, layout in layouts.items():
                    times[kind].append(decode(model, cache, slots, layout, args.steps))
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(f"{rows:>4} {med['base']:>8.1f} {med['same']:>8.1f} {med['mixed']:>9.1f} "
                  f"{med['same'] / med['base']:>9.3f} {med['mixed'] / med['base']:>10.3f}")


if __name__ == "__main__":
    main()
