"""Speeds of an `Engine` in the benchmarks' own process: one stream's decode steps, and streams together; and
two engines timed in interleaved rounds, with a table of their ratios."""

from __future__ import annotations

import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence

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


Samples = dict[tuple[str, str], list[float]]


def interleaved_rounds(engines: Mapping[str, Engine], cases: Mapping[str, Callable[[Engine], float]], rounds: int,
                       around: Callable[[str], contextlib.AbstractContextManager[object]] = lambda name: contextlib.nullcontext()
                       ) -> Samples:
    """Every case on each engine once to warm up, then `rounds` rounds of every case on each engine in turn,
    the order of the engines alternating between rounds (so load swings on a shared machine hit them alike),
    each run inside `around(engine name)`. Returns each (case, engine name)'s samples."""
    samples: Samples = {(case, name): [] for case in cases for name in engines}
    for fn in cases.values():
        for name, engine in engines.items():
            with around(name):
                fn(engine)
    for r in range(rounds):
        order = list(engines.items()) if r % 2 == 0 else list(engines.items())[::-1]
        for case, fn in cases.items():
            for name, engine in order:
                with around(name):
                    samples[case, name].append(fn(engine))
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return samples


def ratio_table(samples: Samples, cases: Sequence[str], base: str, other: str) -> str:
    """A markdown table: each case's medians on `base` and `other`, and the median of the rounds' ratios
    (other over base) beside each round's."""
    lines = [f"| case | {base} | {other} | {other} / {base} (median of rounds) | per round |",
             "| --- | ---: | ---: | ---: | --- |"]
    for case in cases:
        a, b = samples[case, base], samples[case, other]
        ratios = [y / x for x, y in zip(a, b, strict=True)]
        lines.append(f"| {case} | {statistics.median(a):.2f} | {statistics.median(b):.2f} | "
                     f"**{statistics.median(ratios):.3f}x** | {', '.join(f'{x:.2f}' for x in ratios)} |")
    return "\n".join(lines)
