"""What a caller hands the engine (a request) and gets back (a handle and a stream of events)."""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .blend import BlendKey
from .errors import InvalidRequest, RahfError, RequestTooLarge
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from .sampling import SamplingParams

BASE_SLOT = "__base__"
"""The label of a row without an adapter (metrics, the engine's slot bookkeeping)."""


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


@dataclass(frozen=True)
class Limits:
    """What a server accepts, whatever is loaded: the model's vocabulary and the configured sizes."""

    vocab_size: int
    max_new_tokens: int
    max_model_len: int
    """prompt + max_tokens, the KV cache slot of one row"""


def check_request(request: GenerationRequest, limits: Limits) -> None:
    """Raise InvalidRequest / RequestTooLarge unless the request itself is servable (the adapters it
    names are the engine's to check, against what is loaded)."""
    p = request.params
    if not request.prompt_ids:
        raise InvalidRequest("the prompt is empty")
    if p.max_tokens < 0:
        raise InvalidRequest("max_tokens must be at least 0")
    if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= limits.vocab_size:
        raise InvalidRequest(f"prompt token ids must be in [0, {limits.vocab_size}) for this model")
    for k in (request.logprobs, request.prompt_logprobs):
        if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"the number of top log-probabilities must be in [0, {MAX_TOP_LOGPROBS}]")
    if p.max_tokens > limits.max_new_tokens:
        raise RequestTooLarge(f"max_tokens {p.max_tokens} is above this server's limit of {limits.max_new_tokens}")
    if len(request.prompt_ids) + p.max_tokens > limits.max_model_len:
        raise RequestTooLarge(f"prompt ({len(request.prompt_ids)} tokens) + max_tokens ({p.max_tokens}) exceeds "
                              f"this server's limit of {limits.max_model_len} tokens per request (--max-model-len)")
    if p.seed is not None and not 0 <= p.seed < 2**63:
        raise InvalidRequest("seed must be in [0, 2**63)")
    if not (math.isfinite(p.temperature) and p.temperature >= 0) or not 0 < p.top_p <= 1:
        raise InvalidRequest("temperature must be >= 0 and top_p in (0, 1]")


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
    cached_tokens: int | None = None
    """Prompt tokens whose keys and values were taken from another request rather than computed (OpenAI's
    `usage.prompt_tokens_details.cached_tokens`); None where the engine does not say."""


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
