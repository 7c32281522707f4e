"""Load test: concurrent streaming clients against a real `rahf-serve` process on loopback.

    python benchmarks/load_test.py                            # 32 clients x 60 s, tiny random model
    python benchmarks/load_test.py --clients 8 --seconds 10   # the CI size (tests/hardening/test_load.py)
    python benchmarks/load_test.py --real                     # the embedded SmolLM2-135M

The server runs in its own process (`python -m app.server --no-ui`), so its resident memory is its
own and the clients do not share its GIL. Each client streams chat completions in a loop, cycling
through base / adapter / blend / steering; every `--disconnect-every`-th request of a client drops
the connection after its first token. Adapters are random LoRA bundles with steering vectors
written to a temp dir (speed does not depend on the weights' values); nothing in adapters/ is read.

Exit status 1 when any request failed that was not dropped on purpose, /health missed a poll, or
generations were still running after their clients had gone (or fewer were cancelled than dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live import wait_until_up  # noqa: E402

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
MODES = ("base", "adapter", "blend", "steering")
DROP_MAX_TOKENS = 256
"""dropped requests ask for many tokens, so they are certainly still generating when the client leaves"""


@dataclass
class Stats:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    failures: list[str] = field(default_factory=list)
    tokens: int = 0
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    by_mode: dict[str, int] = field(default_factory=dict)
    health_ok: int = 0
    health_failures: list[str] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)
    """the server's resident memory at each health poll, to tell a leak from one-off growth"""


def build_fixtures(root: Path, real: bool) -> tuple[str, Path]:
    """The base to serve (a tiny random llama, or the embedded alias) and a dir with two adapters."""
    from rahf_serve.models import embedded_tokenizer, load_base
    from tests.conftest import build_tiny_model_dir
    from tests.helpers import random_lora_bundle

    spec = "smollm2-135m-instruct" if real else str(build_tiny_model_dir(root / "tiny", embedded_tokenizer()))
    base = load_base(spec, device="cpu", dtype="float32")
    for seed, name in enumerate(("kind", "terse"), start=1):
        random_lora_bundle(base, root / "adapters" / name, seed=seed, r=8)
    return spec, root / "adapters"


def request_body(mode: str, base: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "kind" if mode in ("adapter", "steering") else base, "messages": PROMPT,
                            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": 0.8}
    if mode == "blend":
        body["adapters"] = [{"name": "kind", "weight": 0.7}, {"name": "terse", "weight": 0.3}]
    if mode == "steering":
        body["steering"] = {"adapter": "kind", "coeff": 4.0}
    return body


async def one_request(http: httpx.AsyncClient, body: dict[str, Any], drop: bool, stats: Stats) -> None:
    stats.requests += 1
    start = time.perf_counter()
    first: float | None = None
    received, done, usage = 0, False, None
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                stats.failures.append(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    stats.failures.append(f"stream error: {event['error']}")
                    return
                if event.get("usage"):
                    usage = event["usage"]["completion_tokens"]
                if event["choices"] and event["choices"][0]["delta"].get("content"):
                    received += 1
                    if first is None:
                        first = time.perf_counter() - start
                        stats.ttft.append(first)
                    if drop:
                        break  # leaving the `async with` closes the connection mid-stream
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as err:
        stats.failures.append(f"{type(err).__name__}: {err}")
        return
    if drop and received:
        stats.disconnected += 1
        stats.tokens += received
    elif done and usage is not None:
        stats.completed += 1
        stats.tokens += usage
        stats.latency.append(time.perf_counter() - start)
    else:
        stats.failures.append(f"stream ended without [DONE] and usage after {received} chunks")


async def client_loop(index: int, url: str, base: str, args: argparse.Namespace, deadline: float,
                      stats: Stats) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as http:
        n = 0
        while time.monotonic() < deadline:
            mode = MODES[(index + n) % len(MODES)]
            drop = args.disconnect_every > 0 and n % args.disconnect_every == args.disconnect_every - 1
            stats.by_mode[mode] = stats.by_mode.get(mode, 0) + 1
            await one_request(http, request_body(mode, base, DROP_MAX_TOKENS if drop else args.max_tokens), drop,
                              stats)
            n += 1


async def poll_health(url: str, proc: psutil.Process, stop: asyncio.Event, stats: Stats) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        while not stop.is_set():
            stats.rss.append(proc.memory_info().rss)
            try:
                r = await http.get("/health")
                if r.status_code == 200 and r.json()["status"] == "ok":
                    stats.health_ok += 1
                else:
                    stats.health_failures.append(f"HTTP {r.status_code}")
            except httpx.HTTPError as err:
                stats.health_failures.append(f"{type(err).__name__}: {err}")
            try:
                await asyncio.wait_for(stop.wait(), timeout=0.5)
            except asyncio.TimeoutError:
                pass


def metric(text: str, name: str) -> float:
    """Sum of a Prometheus family's samples (all label sets)."""
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def start_server(spec: str, adapter_dir: Path, port: int, args: argparse.Namespace, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.server", "--base", spec, "--adapter-dir", str(adapter_dir), "--no-ui",
           "--port", str(port), "--device", "cpu", "--threads", str(args.threads), "--max-batch",
           str(args.max_batch), "--max-queue", str(max(64, 2 * args.clients)), "--max-new-tokens",
           str(DROP_MAX_TOKENS)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


async def run_load(url: str, proc: psutil.Process, args: argparse.Namespace) -> dict[str, Any]:
    base = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]["id"]
    warm = Stats()
    async with httpx.AsyncClient(base_url=url, timeout=args.request_timeout) as http:
        # Warm-up: every mode once with and once without a drop, so caches (blend, steering) exist.
        for mode in MODES:
            for drop in (False, True):
                await one_request(http, request_body(mode, base, args.max_tokens), drop, warm)
    rss_warm = proc.memory_info().rss
    before = httpx.get(url + "/metrics", timeout=10).text
    stats, stop = Stats(), asyncio.Event()
    health = asyncio.create_task(poll_health(url, proc, stop, stats))
    deadline = time.monotonic() + args.seconds
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client_loop(i, url, base, args, deadline, stats)
                                            for i in range(args.clients))),
                           timeout=args.seconds + args.request_timeout + 30)
    elapsed = time.perf_counter() - started
    # Give the server a bounded moment to notice the last disconnects, then read what is still running.
    settle = time.monotonic() + 30
    while True:
        after = httpx.get(url + "/metrics", timeout=10).text
        busy = metric(after, "rahf_running_requests") + metric(after, "rahf_queue_depth")
        if busy == 0 or time.monotonic() > settle:
            break
        await asyncio.sleep(0.2)
    stop.set()
    await health
    rss_end = proc.memory_info().rss
    cancelled = metric(after, "rahf_cancelled_generations_total") - metric(before, "rahf_cancelled_generations_total")
    generated = metric(after, "rahf_generated_tokens_total") - metric(before, "rahf_generated_tokens_total")
    return {"clients": args.clients, "seconds": round(elapsed, 1), "requests": stats.requests,
            "completed": stats.completed, "disconnected": stats.disconnected, "failed": len(stats.failures),
            "failures": stats.failures[:10], "by_mode": stats.by_mode, "warmup_failures": warm.failures,
            "client_tokens": stats.tokens, "tokens_per_s": round(stats.tokens / elapsed, 1),
            "server_generated_tokens": int(generated),
            "latency_p50_s": pct(stats.latency, 50), "latency_p99_s": pct(stats.latency, 99),
            "ttft_p50_s": pct(stats.ttft, 50), "ttft_p99_s": pct(stats.ttft, 99),
            "rss_after_warmup_mib": mib(rss_warm), "rss_end_mib": mib(rss_end),
            "rss_growth_mib": mib(rss_end - rss_warm),
            "rss_quartiles_mib": [mib(stats.rss[min(len(stats.rss) - 1, len(stats.rss) * q // 4)]) for q in range(5)],
            "health_polls_ok": stats.health_ok,
            "health_failures": stats.health_failures[:10], "cancelled_generations": int(cancelled),
            "still_running_after": int(busy)}


def pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0], 3)


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def verdict(result: dict[str, Any]) -> list[str]:
    """Why the run failed; empty when it passed."""
    problems = []
    if result["failed"] or result["warmup_failures"]:
        problems.append(f"{result['failed']} requests failed: {result['failures'] or result['warmup_failures']}")
    if result["health_failures"] or not result["health_polls_ok"]:
        problems.append(f"/health missed polls: {result['health_failures']}")
    if result["still_running_after"]:
        problems.append(f"{result['still_running_after']} generations still running after every client left")
    if result["cancelled_generations"] < result["disconnected"]:
        problems.append(f"{result['disconnected']} clients disconnected but only "
                        f"{result['cancelled_generations']} generations were cancelled")
    if not result["completed"]:
        problems.append("no request completed")
    return problems


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.serving.conftest import free_port

    with tempfile.TemporaryDirectory(prefix="rahf-load-") as tmp:
        spec, adapter_dir = build_fixtures(Path(tmp), args.real)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(spec, adapter_dir, port, args, Path(tmp) / "server.log")
        try:
            wait_until_up(url, server, timeout=300)
            result = asyncio.run(run_load(url, psutil.Process(server.pid), args))
        except BaseException:
            sys.stderr.write((Path(tmp) / "server.log").read_text()[-4000:])
            raise
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=30)
    result["model"] = "embedded SmolLM2-135M" if args.real else "tiny random llama (4 layers, hidden 64)"
    result["machine"] = f"{os.cpu_count()} CPUs (psutil: {psutil.cpu_count(logical=False)} physical)"
    result["problems"] = verdict(result)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60, help="clients start no new request after this")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per completed (not dropped) request")
    ap.add_argument("--disconnect-every", type=int, default=5, help="every Nth request drops mid-stream (0: never)")
    ap.add_argument("--max-batch", type=int, default=8, help="the server's --max-batch")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (1 on a shared machine)")
    ap.add_argument("--request-timeout", type=float, default=300, help="a request slower than this fails")
    ap.add_argument("--real", action="store_true", help="serve the embedded SmolLM2-135M instead of a tiny model")
    ap.add_argument("--json", type=Path, help="also write the result here")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    for problem in result["problems"]:
        print("FAIL:", problem, file=sys.stderr)
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
