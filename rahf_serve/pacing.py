"""Step pacing: how much prompt work a step may carry so running streams keep their rhythm.

A token budget counts work, but what a running stream feels is time: on a CPU a step of a few decoding
rows is mostly the fixed cost of reading the weights, so the same budget that is harmless there can
triple a step once attention over a long prompt joins it, and it costs differently on every machine.
The pacer learns from the steps the engine runs the time of a decode-only step and what a prompt chunk
adds to it, as a cost per token (its Linear work) plus a cost per key its queries attend to, and caps
each chunk at what keeps the step within `slowdown` x a decode-only step.

`slowdown` is a bound, not an aim: a pacer that aims at it puts half the steps above it by the spread of
step times. So it also keeps how far recent predictions missed, each chunked step's time over its
prediction, and aims at the bound divided by the `quantile` of those ratios (0.95: were the coming steps
to miss as the recent ones did, 95% of them would stay under the bound), never lower than a quarter of
the way from 1 to it (a noisy machine slows a long prompt but does not stop it). The step times' tail is
longer than their mean error says: aiming two mean errors below the bound left 4-6% of steps above it.
It also aims below the latest chunked step's miss (`follow_latest`): a shared machine's slow spells last
several steps (on the project's 2-core VM, half a second to a second in which every step, decode-only ones
alike, takes 1.4-1.8x as long, the thread on the CPU throughout), so a step that ran slow says the next
will too: after a step over the 95th percentile of misses, 35-45% of next steps were over it, against 5%.
Until it has `warmup` misses to take a quantile of, it assumes they are at least `prior_miss`: with none
it aimed at the bound itself, and the first chunk it predicted could be the slowest step of a long
prompt's join (2.09x at a bound of 1.8 where the project's CPU's misses have a 95th percentile of
1.09-1.12 and a 99th of about 1.17).

The two costs are a weighted least-squares fit over recent chunked steps, not one average per unit of
work, so the price of a chunk follows its context at the ratio of attention to Linear time this machine
has; the FLOP ratio (`kvcache.key_cost`) is only the fit's prior (on the project's 2-core CPU the fit
lands within 15% of it).

A decode-only step does not stay the same while a long prompt is fed: the running streams' own contexts
grow a token a step, and on the project's CPU eight streams' step is 40% slower 700 tokens on. Timed once
before the join, it goes stale, and the pacer then blames the streams' growth on the prompt's chunks,
shrinking them to a token a step. So every `refresh_every` chunked steps the prompt sits one step out, and
that decode-only step refreshes the time the chunks are measured against (the prompt loses one step in
`refresh_every` + 1).

Until it has timed a decode-only step it feeds no prompt next to decoding rows (one step, once); until it
has timed a chunk it feeds no more than the decoding rows' own work, a probe that cannot slow a step
much. A step with no decoding row is never capped. Chunk sizes then depend on measured time, so the
split of a prompt into chunks is not reproducible run to run; it changes nothing but float rounding in
what a row computes.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .errors import RahfError


def chunk_keys(context: int, tokens: int) -> int:
    """Keys the queries of a `tokens`-token chunk attend to when `context` tokens precede it (each query
    sees the context, the chunk's earlier tokens and itself)."""
    return tokens * context + tokens * (tokens + 1) // 2


def tokens_within(units: float, context: int, key_cost: float) -> int:
    """The prompt tokens (at least 1) a row with `context` cached tokens may feed within `units` of work,
    a query at context L costing 1 + L x key_cost units (the engine's budget unit)."""
    return max(1, int(units / (1 + (context + units) * key_cost)))


def quantile(values: Iterable[float], q: float) -> float:
    """The `q` quantile of `values` (one of them: the lower of two neighbours; at least one value)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class PacedStep(NamedTuple):
    """One timed step that fed prompt chunks next to decoding rows, all times in decode-only steps."""

    took: float
    """its wall time"""
    predicted: float | None
    """what the pacer's fit said it would take (None before any chunk was timed: the probe)"""
    tokens: int
    keys: int


class StepPacer:
    """Moving statistics of step times; `caps` turns them into the prompt tokens each row may feed."""

    def __init__(self, slowdown: float, key_cost: float, smoothing: float = 0.25, quantile: float = 0.95,
                 refresh_every: int = 16, window: int = 128, prior_miss: float = 1.15, warmup: int = 16,
                 follow_latest: bool = True) -> None:
        if not slowdown > 1.0:
            raise RahfError(f"--max-step-slowdown must be above 1.0 (got {slowdown}): at 1.0 no prompt could be fed "
                             "while other rows decode")
        self.slowdown = slowdown
        self.key_cost = key_cost
        """the prior: a key's cost as a fraction of a token's, used until chunks at different contexts tell them apart"""
        self.smoothing = smoothing
        if not 0.0 <= quantile <= 1.0:
            raise RahfError(f"the pacer's quantile must be within [0, 1] (got {quantile})")
        self.quantile = quantile
        """the quantile of recent misses (time over prediction) the aim leaves room for (0: aim at the bound)"""
        self.misses: deque[float] = deque(maxlen=window)
        """the latest chunked steps' time over their predicted time"""
        self.prior_miss, self.warmup = prior_miss, warmup
        """the least miss factor assumed while fewer than `warmup` misses were seen"""
        self.follow_latest = follow_latest
        """whether the miss factor is also at least the latest chunked step's miss"""
        self.refresh_every = refresh_every
        """chunked steps after which the prompts sit a step out to time a decode-only step again (0: never)"""
        self.decode_seconds: float | None = None
        """a decode-only step's time"""
        self._chunked_since_refresh = 0
        self._moments: tuple[float, float, float, float, float] | None = None
        """moving averages of tokens², tokens x keys, keys², tokens x extra seconds, keys x extra seconds"""
        self.steps: deque[PacedStep] = deque(maxlen=4096)
        """the latest chunked steps, prediction beside outcome: whether a slow step was mispredicted or the
        machine stalled (benchmarks/join_bench.py reports them)"""

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def observe(self, decode_units: float, tokens: int, keys: int, seconds: float) -> None:
        """Record a finished step: its decoding work (in the budget's units), the prompt tokens it fed and
        the keys their queries attended to, and its wall time."""
        if decode_units <= 0:
            return
        if tokens <= 0:
            self.decode_seconds = self._mix(self.decode_seconds, seconds)
            self._chunked_since_refresh = 0
            return
        if self.decode_seconds is None:
            return
        self._chunked_since_refresh += 1
        costs = self.costs()
        predicted = None
        if costs is not None:
            predicted = 1.0 + (costs[0] * tokens + costs[1] * keys) / self.decode_seconds
            self.misses.append(seconds / self.decode_seconds / predicted)
        self.steps.append(PacedStep(seconds / self.decode_seconds, predicted, tokens, keys))
        extra = max(seconds - self.decode_seconds, 1e-6)
        new = (tokens * tokens, tokens * keys, keys * keys, tokens * extra, keys * extra)
        old = self._moments
        # Moving averages, not the latest step: reacting to every slow step (a busy machine) shrank
        # chunks until each step was mostly its fixed costs.
        self._moments = new if old is None else tuple(self._mix(o, n) for o, n in zip(old, new, strict=True))

    def miss_factor(self) -> float:
        """How much longer than predicted a step may take: the `quantile` of recent misses, at least 1, at
        least the latest miss (`follow_latest`), and at least `prior_miss` until `warmup` misses were seen (1
        when `quantile` is 0: aim at the bound)."""
        if not self.quantile:
            return 1.0
        seen = quantile(self.misses, self.quantile) if self.misses else 1.0
        latest = self.misses[-1] if self.follow_latest and self.misses else 1.0
        return max(1.0, seen, latest, self.prior_miss if len(self.misses) < self.warmup else 1.0)

    def costs(self) -> tuple[float, float] | None:
        """(seconds a prompt token adds, seconds a key adds), or None before any chunk was timed."""
        if self._moments is None:
            return None
        tt, tk, kk, ty, ky = self._moments
        c = self.key_cost
        # Ridge toward key = c x token, weak against the data: when every timed chunk had the same ratio
        # of keys to tokens the data cannot tell the two costs apart and the prior decides.
        mu = 1e-6 * kk
        a11, a12, a22 = tt + mu * c * c, tk - mu * c, kk + mu
        det = a11 * a22 - a12 * a12
        token = (ty * a22 - ky * a12) / det if det > 0 else -1.0
        key = (ky * a11 - ty * a12) / det if det > 0 else -1.0
        if token <= 0 or key <= 0:  # noise pushed one below zero: one cost along the prior's ratio
            per_unit = (ty + c * ky) / (tt + 2 * c * tk + c * c * kk)
            token, key = per_unit, per_unit * c
        return token, key

    def caps(self, decode_units: float, contexts: Sequence[int]) -> list[int] | None:
        """Prompt tokens each prefilling row (with `contexts[i]` tokens already in its cache) may feed in a
        step next to `decode_units` of decoding; None: no cap (nothing decodes). Rows share the time
        equally; a row deep into a long prompt gets fewer tokens, each of its queries attending to more keys."""
        if decode_units <= 0:
            return None
        if self.decode_seconds is None or 0 < self.refresh_every <= self._chunked_since_refresh:
            return [0] * len(contexts)
        costs = self.costs()
        if costs is None:  # the probe: the decoding rows' own work, in prior units
            share = decode_units / len(contexts)
            return [tokens_within(share, ctx, self.key_cost) for ctx in contexts]
        token, key = costs
        allowance = max(self.slowdown / self.miss_factor() - 1.0, (self.slowdown - 1.0) / 4)
        budget = allowance * self.decode_seconds / len(contexts)
        # the largest n with token x n + key x chunk_keys(ctx, n) <= budget (chunk_keys ~ n ctx + n^2 / 2)
        out = []
        for ctx in contexts:
            lin = token + key * (ctx + 0.5)
            n = (-lin + math.sqrt(lin * lin + 2 * key * budget)) / key
            out.append(max(1, int(n)))
        return out
