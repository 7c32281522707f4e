"""Serving metrics in the Prometheus text format (a few dozen lines; no client library needed).

One `ServingMetrics` per engine, so tests and embedded users get their own counters.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

LabelKey = tuple[tuple[str, str], ...]


def _labels(key: LabelKey, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = key + extra
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped, strict=True)) + "}"


class _Family:
    def __init__(self, name: str, help_: str, kind: str) -> None:
        self.name, self.help, self.kind = name, help_, kind
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Family):
    def __init__(self, name: str, help_: str) -> None:
        super().__init__(name, help_, "counter")
        self._values: dict[LabelKey, float] = defaultdict(float)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            self._values[tuple(sorted(labels.items()))] += amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def total(self) -> float:
        """The sum over every label set."""
        with self._lock:
            return sum(self._values.values())

    def render(self) -> list[str]:
        with self._lock:
            return self.header() + [f"{self.name}{_labels(k)} {v}" for k, v in sorted(self._values.items())]


class Gauge(_Family):
    def __init__(self, name: str, help_: str) -> None:
        super().__init__(name, help_, "gauge")
        self.current = 0.0

    def set(self, value: float) -> None:
        self.current = float(value)

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {self.current}"]


class Histogram(_Family):
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        super().__init__(name, help_, "histogram")
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)
        self._sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value
            self.count += 1

    def render(self) -> list[str]:
        with self._lock:
            lines, running = self.header(), 0
            for bound, n in zip(self.buckets + (float("inf"),), self._counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f'{self.name}_bucket{{le="{le}"}} {running}')
            return lines + [f"{self.name}_sum {self._sum}", f"{self.name}_count {self.count}"]


class ServingMetrics:
    """Everything /metrics reports; the engine updates it, the API renders it."""

    def __init__(self) -> None:
        self.requests = Counter("rahf_requests_total", "Finished generation requests by adapter and status.")
        self.generated_tokens = Counter("rahf_generated_tokens_total", "Tokens generated, by adapter.")
        self.prompt_tokens = Counter("rahf_prompt_tokens_total", "Prompt tokens prefilled, by adapter.")
        self.prompt_tokens_shared = Counter(
            "rahf_prompt_tokens_shared_total",
            "Prompt tokens whose keys and values were copied from another request with the same prompt start, "
            "adapter and steering instead of prefilled, by adapter.")
        self.cancelled = Counter("rahf_cancelled_generations_total",
                                 "Generations stopped because the client went away or cancelled.")
        self.ttft = Histogram("rahf_time_to_first_token_seconds", "Time from submission to the first token.",
                              (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0))
        self.token_latency = Histogram("rahf_time_per_output_token_seconds",
                                       "Time between consecutive tokens of one stream.",
                                       (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56))
        self.queue_depth = Gauge("rahf_queue_depth", "Requests waiting to join the running batch.")
        self.running = Gauge("rahf_running_requests", "Requests in the running batch.")
        self.adapters_loaded = Gauge("rahf_adapters_loaded", "Adapters loaded (blends not counted).")

    def render(self) -> str:
        families = (self.requests, self.generated_tokens, self.prompt_tokens, self.cancelled, self.ttft,
                    self.token_latency, self.queue_depth, self.running, self.adapters_loaded)
        return "\n".join(line for f in families for line in f.render()) + "\n"
