"""Serving benchmark on the real default model, in one process.

    python benchmarks/serve_bench.py                 # 48 new tokens, medians of 5 rounds
    python benchmarks/serve_bench.py --tokens 32 --runs 3
    python benchmarks/serve_bench.py --threads 1     # on a shared machine: see docs/serving.md

Reports single-stream tokens/s for transformers `generate` on the bare base (the baseline), for the
weight-streaming floor (every Linear layer's GEMV of one decode step, back to back: what a decoder
that did nothing but read its weights once per token would reach; through torch, and through the forward
kernel's products over panels where it builds, which read the weights faster), for the engine on the base on
transformers' forward (the A/B of the engine's own llama forward), and for the engine on the base,
with an adapter, a blend and steering; aggregate tokens/s at 1, 2, 4, 8 and 16 concurrent mixed
streams (base, two adapters, a blend, a steered row); time to first token (idle, and joining 7
running streams); and the time to hot-load a bundle. Adapters are two random rank-8 q_proj/v_proj LoRAs (the paper's shape)
with steering vectors, so no trained bundle is needed; speed does not depend on the weights' values.
The single stream is compared with the floor on its decode steps alone (tokens after the first), since
the floor has no prompt to read; with `generate`, end to end, since both read the same prompt.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_timing import aggregate_speed, decode_speed  # noqa: E402
from rahf_serve.engine import Engine  # noqa: E402
from rahf_serve.forward_kernel import forward_kernel  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.registry import AdapterRegistry  # noqa: E402
from rahf_serve.request import GenerationRequest, SteeringSpec  # noqa: E402
from rahf_serve.sampling import SamplingParams  # noqa: E402
from tests.helpers import random_lora_bundle  # noqa: E402  (the test suite's bundle builder)

PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]


def median_of(runs: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per stream")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (the median is reported)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default, the core count)")
    ap.add_argument("--max-batch", type=int, default=16, help="the engine's --max-batch")
    ap.add_argument("--streams", default="1,2,4,8,16", help="concurrent stream counts for the aggregate rows")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n, runs = args.tokens, args.runs

    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    tok = base.tokenizer
    text = tok.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False)["input_ids"]
    rows: list[tuple[str, float, str]] = []  # (measurement, value, unit)

    # The machine is shared and its load swings: every measurement below runs in rounds, one run of
    # each case per round, so a busy spell hits all cases alike; medians over the rounds.
    bare = copy.deepcopy(base.model)  # the baseline's model stays a plain transformers model
    ids = torch.tensor([prompt])

    def generate_speed() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            bare.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=tok.pad_token_id)
        return n / (time.perf_counter() - start)

    linears = [m for m in bare.modules() if isinstance(m, torch.nn.Linear)]  # lm_head included
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    def streaming_speed(products: list[Callable[[], object]]) -> float:
        """Tokens/s of one pass over `products` (one per Linear) per token."""
        start = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                for product in products:
                    product()
        return n / (time.perf_counter() - start)

    torch_gemvs = [lambda m=m, x=x: torch.nn.functional.linear(x, m.weight) for m, x in zip(linears, inputs, strict=True)]
    kernel = forward_kernel()
    panels = kernel.panels_of([m.weight.detach() for m in linears]) if kernel is not None else []
    c_gemvs = [lambda m=m, x=x[0], p=p: kernel.product(x, p, m.out_features)
               for m, x, p in zip(linears, inputs, panels, strict=False)]
    floor_speed = functools.partial(streaming_speed, torch_gemvs)
    c_floor_speed = functools.partial(streaming_speed, c_gemvs)

    # The same engine on transformers' forward, for the A/B of the engine's own llama forward. Both compute
    # every prompt: the runs repeat theirs, which prefix sharing would otherwise take from the run before
    # (a `generate` beside them computes its prompt every time).
    hf_engine = Engine(load_base("smollm2-135m-instruct", device="cpu", dtype="float32"), max_batch=args.max_batch,
                       max_new_tokens=max(n, 64), packed_forward=False, prefix_sharing=False)
    engine = Engine(base, max_batch=args.max_batch, max_new_tokens=max(n, 64), prefix_sharing=False)
    counts = [int(k) for k in args.streams.split(",")]
    greedy = SamplingParams(max_tokens=n, temperature=0.0)

    def stream_speed(request: GenerationRequest, on: Engine = engine) -> float:
        start = time.perf_counter()
        out = on.generate(request)
        return out.completion_tokens / (time.perf_counter() - start)

    def rounds(cases: dict[str, Callable[[], float]]) -> dict[str, list[float]]:
        for fn in cases.values():
            fn()  # warm-up (and builds the blend once)
        samples: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(runs):
            for label, fn in cases.items():
                samples[label].append(fn())
        return samples

    with engine, hf_engine:
        plain = GenerationRequest(prompt, greedy)
        before = rounds({"baseline": generate_speed, "floor": floor_speed,
                         "engine, base, no adapter loaded": lambda: stream_speed(plain),
                         "engine on transformers' forward, base": lambda: stream_speed(plain, hf_engine)})
        decode = rounds({"floor": floor_speed, **({"C floor": c_floor_speed} if c_gemvs else {}),
                         "engine": lambda: decode_speed(engine, plain),
                         "engine on transformers' forward": lambda: decode_speed(hf_engine, plain)})
        floor = statistics.median(before.pop("floor") + decode.pop("floor"))
        c_floor = statistics.median(decode.pop("C floor")) if c_gemvs else None
        hf_engine.stop()

        workdir = Path(tempfile.mkdtemp(prefix="serve-bench-"))
        for i, name in enumerate(("kind", "terse")):
            random_lora_bundle(base, workdir / name, seed=i, r=8)
        registry = AdapterRegistry(engine, workdir)

        def hot_load() -> float:
            start = time.perf_counter()
            registry.load("hot", str(workdir / "kind"))
            elapsed = time.perf_counter() - start
            registry.unload("hot")
            return elapsed

        hot_load_s = median_of(runs, hot_load)
        registry.load_dir()

        requests = {
            "engine, base row (__base__), adapters loaded": plain,
            "engine, adapter (unmerged LoRA r=8)": GenerationRequest(prompt, greedy, "kind"),
            "engine, blend kind*0.7 + terse*-0.3": GenerationRequest(prompt, greedy,
                                                                    blend=(("kind", 0.7), ("terse", -0.3))),
            "engine, adapter + steering (2 layers)": GenerationRequest(prompt, greedy, "kind",
                                                                     steering=SteeringSpec("kind", 2.0)),
        }
        after = rounds({"baseline": generate_speed,
                        **{label: (lambda r=r: stream_speed(r)) for label, r in requests.items()}})
        baseline = statistics.median(before.pop("baseline") + after.pop("baseline"))
        rows.append(("transformers generate, bare base (baseline)", baseline, "tok/s"))
        rows.append(("weight-streaming floor: one GEMV per Linear per token", floor, "tok/s"))
        if c_floor is not None:
            rows.append(("the same through the forward kernel's products over panels", c_floor, "tok/s"))
        rows += [(label, statistics.median(v), "tok/s") for label, v in {**before, **after}.items()]
        rows += [(f"{label}, base, decode steps only (after the first token)", statistics.median(v), "tok/s")
                 for label, v in decode.items()]

        # Base rows, two adapters, a blend and a steered row, repeated: every count mixes all of them.
        kinds = [GenerationRequest(prompt, greedy), GenerationRequest(prompt, greedy, "kind"),
                 GenerationRequest(prompt, greedy, "terse"),
                 GenerationRequest(prompt, greedy, blend=(("kind", 0.7), ("terse", -0.3))),
                 GenerationRequest(prompt, greedy, "terse", steering=SteeringSpec("kind", 2.0))]
        mix = [kinds[i % len(kinds)] for i in range(max(*counts, 7))]  # 7: the TTFT join below

        concurrency = rounds({f"aggregate, {k} concurrent mixed streams": (lambda k=k: aggregate_speed(engine, mix[:k]))
                              for k in counts})
        rows += [(label, statistics.median(v), "tok/s") for label, v in concurrency.items()]
        aggregates = dict(zip(counts, rows[-len(counts):], strict=True))

        def ttft(background: int) -> float:
            first = threading.Event()
            stamp: list[float] = []
            done = threading.Event()
            for i in range(background):
                engine.submit(mix[i], lambda e: done.set() if e.finish_reason else None)
            time.sleep(0.5 if background else 0)
            start = time.perf_counter()
            engine.submit(GenerationRequest(prompt, SamplingParams(max_tokens=1, temperature=0)),
                          lambda e: (stamp.append(time.perf_counter()), first.set()))
            first.wait(60)
            while background and engine.metrics.running.current > 0:
                time.sleep(0.05)
            return stamp[0] - start

        rows.append(("time to first token, idle engine", median_of(runs, lambda: ttft(0)) * 1000, "ms"))
        rows.append(("time to first token, joining 7 running streams", median_of(runs, lambda: ttft(7)) * 1000,
                     "ms"))
        rows.append(("hot-load a local bundle (read + attach)", hot_load_s * 1000, "ms"))

    print(f"\nrahf-serve benchmark: {base.name}, fp32 CPU, {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), {n} new tokens, "
          f"median of {runs}; load average at end {os.getloadavg()[0]:.1f}\n")
    print("| measurement | value | vs baseline |")
    print("| --- | ---: | ---: |")
    for label, value, unit in rows:
        ratio = f"{value / baseline:.2f}x" if unit == "tok/s" else ""
        print(f"| {label} | {value:.1f} {unit} | {ratio} |")
    print()
    single, single_hf = (next(v for label, v, _ in rows if label.startswith(f"{k}, base, decode"))
                         for k in ("engine", "engine on transformers' forward"))
    print(f"single stream, base, decode steps (after the first token) vs the weight-streaming floor: "
          f"{single / floor:.2f}x ({engine.forward_impl}), {single_hf / floor:.2f}x on transformers' forward")
    if c_floor is not None:
        print(f"... vs the floor through the forward kernel's products: {single / c_floor:.2f}x")
    for k, (_, value, _) in aggregates.items():
        if k != counts[0]:
            print(f"{k} streams vs {counts[0]} stream aggregate: {value / aggregates[counts[0]][1]:.2f}x")
    if 8 in aggregates and 16 in aggregates and counts[0] != 8:  # else the loop above said it
        print(f"16 streams vs 8 streams aggregate: {aggregates[16][1] / aggregates[8][1]:.2f}x")


if __name__ == "__main__":
    main()
