"""Step pacing: how much prompt work a step may carry so running streams keep their rhythm.

A token budget counts work, but what a running stream feels is time: on a CPU a step of a few decoding
rows is mostly the fixed cost of reading the weights, so the same budget that is harmless there can
triple a step once attention over a long prompt joins it, and it costs differently on every machine.
The pacer learns two figures from the steps the engine runs, the time of a decode-only step and the
time of one unit of prompt work (a token of Linear work; a query over a long context counts more, see
`kvcache.key_cost`), and caps a step's prompt work at what keeps the step within `slowdown` x a
decode-only step. Until it has timed a decode-only step it feeds no prompt next to decoding rows
(one step, once); until it has timed prompt work it feeds no more than the decoding rows' own work, a
probe that cannot slow a step much. A step with no decoding row is never capped.

Chunk sizes then depend on measured time, so the split of a prompt into chunks is not reproducible run
to run; it changes nothing but float rounding in what a row computes.
"""

from __future__ import annotations

import math

from .errors import RahfError


class StepPacer:
    """Exponential moving averages of step times; `allowance` turns them into a prompt-work cap."""

    def __init__(self, slowdown: float, smoothing: float = 0.25) -> None:
        if not slowdown > 1.0:
            raise RahfError(f"--max-step-slowdown must be above 1.0 (got {slowdown}): at 1.0 no prompt could be fed "
                             "while other rows decode")
        self.slowdown = slowdown
        self.smoothing = smoothing
        self.decode_seconds: float | None = None
        """a decode-only step's time"""
        self.unit_seconds: float | None = None
        """the time one unit of prompt work adds to a step"""

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.smoothing) * old + self.smoothing * new

    def allowance(self, decode_units: float) -> float:
        """Units of prompt work the next step may carry next to `decode_units` of decoding (inf: no cap)."""
        if decode_units <= 0:
            return math.inf
        if self.decode_seconds is None:
            return 0.0
        if self.unit_seconds is None:
            return decode_units
        return max(1.0, (self.slowdown - 1.0) * self.decode_seconds / self.unit_seconds)

    def observe(self, decode_units: float, prompt_units: float, seconds: float) -> None:
        """Record a finished step: its decoding work, its prompt work and its wall time."""
        if decode_units <= 0:
            return
        if prompt_units <= 0:
            self.decode_seconds = self._mix(self.decode_seconds, seconds)
        elif self.decode_seconds is not None:
            # A moving average, not the latest step: reacting to every slow step (a busy machine, a
            # long context's attention) shrank chunks until each step was mostly its fixed costs.
            extra = max(seconds - self.decode_seconds, 1e-6) / prompt_units
            self.unit_seconds = self._mix(self.unit_seconds, extra)
