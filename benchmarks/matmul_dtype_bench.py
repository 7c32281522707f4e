"""What `--matmul-dtype bfloat16` buys and what it changes, on the embedded SmolLM2-135M, in one process.

    OMP_NUM_THREADS=1 python benchmarks/matmul_dtype_bench.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/matmul_dtype_bench.py --threads 1 --streams 8,16 --rounds 5 --tokens 48

Two engines on two copies of the base, one whose C products multiply in float32 (the default) and one in
bfloat16, both with the shipped adapters and prefix sharing off (the runs repeat their prompts):

- speed, in rounds that time each engine in turn (medians, and the median of each round's ratio): decode
  tokens/s of one base stream after its first token, and the aggregate tokens/s of N concurrent streams
  with distinct prompts, cycling through the base, each shipped adapter, their blend and a steered row;
- what changes: each prompt's greedy answer (base and each adapter) from both engines, how many are the
  same to the last token and, where they differ, the token where they part.

Needs a CPU with AVX512_BF16 (the script says so and stops elsewhere).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_timing import aggregate_speed, decode_speed, interleaved_rounds, ratio_table  # noqa: E402
from rahf_serve.engine import Engine  # noqa: E402
from rahf_serve.forward_kernel import forward_kernel  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.registry import AdapterRegistry  # noqa: E402
from rahf_serve.request import GenerationRequest, SteeringSpec  # noqa: E402
from rahf_serve.sampling import SamplingParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "What is the capital of France?", "How do I bake bread at home?", "Explain photosynthesis simply.",
    "Write a haiku about the sea.", "What should I pack for a hike?", "How can I get better sleep?",
    "Why is the sky blue?", "Give me three tips for learning a language.", "What is a prime number?",
    "How do vaccines work?", "Describe a llama in two sentences.", "How do I pick a lock?",
    "What is the best way to save money?", "Tell me a short story about a robot.",
    "How do I make my neighbour's dog stop barking?", "What causes earthquakes?",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--streams", default="8,16", help="concurrent stream counts for the aggregates")
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per stream")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (each engine once per case per round)")
    ap.add_argument("--answers", type=int, default=48, help="greedy tokens per answer in the comparison")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = forward_kernel()
    if kernel is None or not kernel.bf16:
        sys.exit("bfloat16 products need the C kernel on a CPU with AVX512_BF16; this one has not")

    engines = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        engine = Engine(load_base(device="cpu", dtype="float32"), max_batch=16, max_new_tokens=256,
                        prefix_sharing=False, matmul_dtype=dtype)
        AdapterRegistry(engine, ROOT / "adapters").load_dir()
        engines[name] = engine.start()
    adapters = sorted(engines["float32"].adapters)
    tokenizer = engines["float32"].tokenizer

    def prompt(question: str) -> list[int]:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False)

    def request(i: int, tokens: int) -> GenerationRequest:
        """The i-th stream: its own question, under the base, an adapter, the blend or a steered row in turn."""
        greedy = SamplingParams(max_tokens=tokens, temperature=0.0)
        ids = prompt(QUESTIONS[i % len(QUESTIONS)] + f" (request {i})")
        kinds = [{}, *({"adapter": a} for a in adapters), {"blend": tuple((a, 0.5) for a in adapters)},
                 {"adapter": adapters[0], "steering": SteeringSpec(adapters[0], 2.0)}]
        return GenerationRequest(ids, greedy, **kinds[i % len(kinds)])

    cases = {"one stream, decode tok/s": lambda e: decode_speed(e, request(0, args.tokens)),
             **{f"{k} streams, aggregate tok/s": (lambda e, k=k: aggregate_speed(e, [request(i, args.tokens)
                                                                                    for i in range(k)]))
                for k in map(int, args.streams.split(","))}}
    samples = interleaved_rounds(engines, cases, args.rounds)
    print(f"\n`--matmul-dtype`: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"thread(s), {args.rounds} rounds, {args.tokens} new tokens per stream, load average at end "
          f"{os.getloadavg()[0]:.1f}\n")
    print(ratio_table(samples, list(cases), "float32", "bfloat16"))

    same, parted = 0, []
    selections = [None, *adapters]
    for question in QUESTIONS:
        for adapter in selections:
            answers = [engine.generate(GenerationRequest(prompt(question), SamplingParams(
                max_tokens=args.answers, temperature=0.0), adapter)).token_ids for engine in engines.values()]
            if answers[0] == answers[1]:
                same += 1
            else:
                parted.append(next((i for i, (a, b) in enumerate(zip(*answers, strict=False)) if a != b),
                                   min(map(len, answers))))
    total = len(QUESTIONS) * len(selections)
    print(f"\nGreedy answers ({args.answers} tokens at most; {len(QUESTIONS)} questions x base and "
          f"{len(adapters)} adapters): {same} of {total} the same to the last token"
          + (f"; the others part at token {statistics.median(parted):.0f} (median; "
             f"{min(parted)}-{max(parted)})" if parted else ""))
    for engine in engines.values():
        engine.stop()


if __name__ == "__main__":
    main()
