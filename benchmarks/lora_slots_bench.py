"""One decode step with LoRA rows: PEFT's mixed-batch path against LoraSlots, as more adapters are loaded.

    OMP_NUM_THREADS=1 python benchmarks/lora_slots_bench.py                 # 1, 16, 64 adapters, 5 runs (about 3 minutes)
    python benchmarks/lora_slots_bench.py --loaded 1 64 --runs 9 --steps 5

The real default model (SmolLM2-135M, 30 layers, float32), 8 rows, a 64-token context in a DynamicCache
(each step appends one token, then the cache is cropped back, so every step sees the same context).
The shipped bundles (r 16; Dual on every Linear, SCIT on q/k/v/o) are loaded under N names, alternating. Rows are all base, all one
adapter ("same"), or adapter i % N in row i ("mixed": 8 different ones once N >= 8). All six variants
alternate within every run; each cell is the median over runs of the mean step time.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.bundle import read_bundle  # noqa: E402
from rahf_serve.lora_slots import LoraSlots, read_lora  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "adapters" / "smollm2-135m-rahf-dual", ROOT / "adapters" / "smollm2-135m-rahf-scit"]
ROWS, CONTEXT = 8, 64


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
            f"python {platform.python_version()}")


def stepper(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> Callable[[int], float]:
    """Mean time of `steps` decode steps of `model` over a fixed 64-token context."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :CONTEXT], cache=cache, use_cache=True, **kwargs)
    token = ids[:, CONTEXT:CONTEXT + 1]

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            model(input_ids=token, cache=cache, use_cache=True, logits_to_keep=1, **kwargs)
            cache.crop(-1)
        return (time.perf_counter() - start) / steps

    return run


def slot_stepper(slots: LoraSlots, ids: torch.Tensor, rows: list[int | None]) -> Callable[[int], float]:
    slots.set_rows(rows)
    run = stepper(slots.model, ids)

    def step(steps: int) -> float:
        slots.set_rows(rows)  # once per step in the engine; outside the timed loop here
        return run(steps)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loaded", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print("machine:", machine())
    from peft import PeftModel

    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    plain = base.model.eval()
    ids = torch.randint(0, plain.config.vocab_size, (ROWS, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    bundles = [read_bundle(p) for p in SHIPPED]
    weights = [read_lora(b) for b in bundles]
    peft = PeftModel.from_pretrained(copy.deepcopy(plain), str(SHIPPED[0]), adapter_name="a0").eval()
    slots = LoraSlots(plain, max_loras=max(args.loaded), max_rank=16)
    slots.load_weights("a0", weights[0])
    loaded = 1
    print(f"{'loaded':>6} {'rows':>6} {'PEFT ms':>8} {'slots ms':>9} {'slots/PEFT':>10} "
          f"{'PEFT vs base':>12} {'slots vs base':>13}")
    results: dict[tuple[int, str], tuple[float, float]] = {}
    with torch.inference_mode():
        for n in sorted(args.loaded):
            started = time.perf_counter()
            for i in range(loaded, n):
                peft.load_adapter(str(SHIPPED[i % 2]), adapter_name=f"a{i}")
                slots.load_weights(f"a{i}", weights[i % 2])
            loaded = max(loaded, n)
            load_s = time.perf_counter() - started
            layouts = {"base": [None] * ROWS, "same": ["a0"] * ROWS, "mixed": [f"a{i % n}" for i in range(ROWS)]}
            runners = {}
            for kind, names in layouts.items():
                runners[("peft", kind)] = stepper(peft, ids, adapter_names=[m or "__base__" for m in names])
                runners[("slots", kind)] = slot_stepper(slots, ids, [None if m is None else slots.slot_of(m)
                                                                     for m in names])
            times: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
            for run in runners.values():  # warm-up
                run(1)
            for _ in range(args.runs):
                for key, run in runners.items():
                    times[key].append(run(args.steps))
            med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
            for kind in layouts:
                p, s = med[("peft", kind)], med[("slots", kind)]
                results[(n, kind)] = (p, s)
                print(f"{n:>6} {kind:>6} {p:>8.1f} {s:>9.1f} {s / p:>10.2f} "
                      f"{p / med[('peft', 'base')]:>12.3f} {s / med[('slots', 'base')]:>13.3f}")
            print(f"{'':>6} (loading {n - 1 if n > 1 else 0} more adapters into both took {load_s:.1f} s)")
    first, last = min(args.loaded), max(args.loaded)
    if first != last:
        for kind in ("base", "same", "mixed"):
            p0, s0 = results[(first, kind)]
            p1, s1 = results[(last, kind)]
            print(f"{kind:>6} rows, {last} loaded / {first} loaded: PEFT {p1 / p0:.3f}, slots {s1 / s0:.3f}")


if __name__ == "__main__":
    main()
