"""Prompt chunks' LoRA through the C row kernel (every LoRA token a one-token row) against torch's matmul pair
per chunk and module (how chunks went before), on the embedded SmolLM2-135M, in one process.

    OMP_NUM_THREADS=1 python benchmarks/chunk_lora_bench.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/chunk_lora_bench.py --threads 1 --matmul-dtype bfloat16 --rounds 5

Two engines on two copies of the base, the shipped adapters loaded, prefix sharing off (the rounds repeat
their prompts). One plans its steps as the engine does; the other with this script's copy of the earlier
planning, in which only one-token rows went to the kernel and a prompt chunk on an adapter took torch's
products, one call from Python per module (`torch`). Each round times every case on each engine in turn,
the order alternating between rounds: the aggregate tokens/s of 8 and 16 concurrent streams with distinct
prompts (the base, each adapter, their blend and a steered row in turn, 48 new tokens), and the time to
the first token of a 1,000-token prompt on an adapter alone. Reports medians and the median of each
round's ratio (kernel over torch: above 1 is faster for speeds, slower for times).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_timing import aggregate_speed, interleaved_rounds, ratio_table  # noqa: E402
from benchmarks.matmul_dtype_bench import QUESTIONS  # noqa: E402
from rahf_serve import lora_slots  # noqa: E402
from rahf_serve.engine import MATMUL_DTYPES, Engine  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.registry import AdapterRegistry  # noqa: E402
from rahf_serve.request import GenerationRequest, SteeringSpec  # noqa: E402
from rahf_serve.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_planned = lora_slots._plan_packed


def chunks_through_torch(plan, slots: Sequence[int | None], tokens: Sequence[int], device, kernel: bool,
                         rank: int) -> None:
    """The earlier planning: the kernel takes one-token rows; a row feeding several tokens is a segment,
    which `SlotLinear.add_packed` multiplies with torch's products."""
    ones = [s if n == 1 else None for s, n in zip(slots, tokens, strict=True)]
    _planned(plan, ones, tokens, device, kernel, rank)
    at = 0
    for slot, n in zip(slots, tokens, strict=True):
        if slot is not None and n > 1:
            plan.segments.append((at, at + n, slot))
        at += n


class Planning:
    """Which planning `lora_slots` uses while an engine runs (one engine runs at a time here)."""

    def __init__(self, old: bool) -> None:
        self.old = old

    def __enter__(self) -> None:
        lora_slots._plan_packed = chunks_through_torch if self.old else _planned

    def __exit__(self, *exc: object) -> None:
        lora_slots._plan_packed = _planned


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--matmul-dtype", choices=list(MATMUL_DTYPES), default="float32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = {}
    for name in ("kernel", "torch"):
        engine = Engine(load_base(device="cpu", dtype="float32"), max_batch=16, max_new_tokens=256,
                        prefix_sharing=False, matmul_dtype=MATMUL_DTYPES[args.matmul_dtype])
        AdapterRegistry(engine, ROOT / "adapters").load_dir()
        engines[name] = engine.start()
    if engines["kernel"]._slots.kernel is None:
        sys.exit("the C row kernel is not available here (see the log): nothing to compare")
    adapters = sorted(engines["kernel"].adapters)
    tokenizer = engines["kernel"].tokenizer
    draw = torch.Generator().manual_seed(0)

    def request(i: int) -> GenerationRequest:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        kinds = [{}, *({"adapter": a} for a in adapters), {"blend": tuple((a, 0.5) for a in adapters)},
                 {"adapter": adapters[0], "steering": SteeringSpec(adapters[0], 2.0)}]
        return GenerationRequest(ids, SamplingParams(max_tokens=48, temperature=0.0), **kinds[i % len(kinds)])

    def first_token(engine: Engine) -> float:
        ids = torch.randint(100, 40_000, (args.prompt_tokens,), generator=draw).tolist()
        start = time.perf_counter()
        engine.generate(GenerationRequest(ids, SamplingParams(max_tokens=1, temperature=0.0), adapters[0]))
        return time.perf_counter() - start

    cases = {"8 streams, aggregate tok/s": lambda e: aggregate_speed(e, [request(i) for i in range(8)]),
             "16 streams, aggregate tok/s": lambda e: aggregate_speed(e, [request(i) for i in range(16)]),
             f"{args.prompt_tokens}-token prompt on an adapter, first token s": first_token}
    samples = interleaved_rounds(engines, cases, args.rounds, lambda name: Planning(old=name == "torch"))
    for engine in engines.values():
        engine.stop()
    print(f"\nPrompt chunks' LoRA: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"thread(s), products in {args.matmul_dtype}, {args.rounds} rounds, load average at end "
          f"{os.getloadavg()[0]:.1f}\n")
    print(ratio_table(samples, list(cases), "torch", "kernel"))


if __name__ == "__main__":
    main()
