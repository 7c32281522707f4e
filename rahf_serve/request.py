"""What a caller hands the engine (a request) and gets back (a handle and a stream of events)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .blend import BlendKey
from .errors import RahfError
from .logprobs import TokenLogprob
from .sampling import SamplingParams

BASE_SLOT = "__base__"
"""PEFT's name for "no adapter" in a mixed batch."""


@dataclass(frozen=True)
class SteeringSpec:
    adapter: str
    """A loaded adapter whose bundle carries mean difference vectors."""
    coeff: float
    layers: tuple[int, ...] | None = None
    """Subset of the bundle's layers; None = all of them."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: Sequence[int]
    params: SamplingParams = SamplingParams()
    adapter: str | None = None
    """A loaded adapter name; None = the base."""
    blend: BlendKey | None = None
    """((adapter, weight), ...): the exact weighted sum of their deltas. Excludes `adapter`."""
    steering: SteeringSpec | None = None
    logprobs: int | None = None
    """Return each generated token's log-probability with this many alternatives; None = none."""
    prompt_logprobs: int | None = None
    """The same for every prompt token (OpenAI's `echo`), from the prefill of this row; None = none."""

    @property
    def label(self) -> str:
        """How metrics name this request's model."""
        if self.blend:
            return "blend:" + "+".join(n for n, _ in self.blend)
        return self.adapter or BASE_SLOT


@dataclass
class StreamEvent:
    text: str = ""
    """New text since the previous event."""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    """None while running; "stop", "length", "cancelled" or "error" on the last event."""
    error: RahfError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    """One per token in `token_ids`, when the request asked for them."""
    prompt_logprobs: list[TokenLogprob] | None = None
    """On a request's first event only, when it asked for them: one per prompt token."""


Sink = Callable[[StreamEvent], None]


class RequestHandle:
    """What `submit` returns: an id and a way to stop the generation (e.g. the client went away)."""

    _ids = itertools.count(1)

    def __init__(self) -> None:
        self.id = next(self._ids)
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()
