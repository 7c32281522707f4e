"""Speeds of an `Engine` in the benchmarks' own process: one stream's decode steps, and streams together."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from rahf_serve.engine import Engine
from rahf_serve.request import GenerationRequest


def decode_speed(engine: Engine, request: GenerationRequest) -> float:
    """Tokens/s of `request` after its first token: decode steps only (no prefill in it)."""
    stamps: list[float] = []
    done = threading.Event()

    def sink(event) -> None:
        if event.token_ids:
            stamps.append(time.perf_counter())
        if event.finish_reason:
            done.set()

    engine.submit(request, sink)
    done.wait(600)
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def aggregate_speed(engine: Engine, requests: Sequence[GenerationRequest]) -> float:
    """Tokens/s of `requests` run concurrently, one client thread each, from the first submit to the last
    token."""
    counts = [0] * len(requests)

    def worker(i: int) -> None:
        counts[i] = engine.generate(requests[i]).completion_tokens

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(requests))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - start)
