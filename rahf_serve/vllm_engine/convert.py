"""Our request types to vLLM's and back: sampling parameters, prompt inputs, log-probabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..logprobs import TokenLogprob
from ..request import GenerationRequest
from .steering import STEERING_KEY


def steering_args(request: GenerationRequest, vector_layers: Sequence[int]) -> dict[str, Any] | None:
    """What the worker extension reads from `extra_args`; None when the request does not steer."""
    spec = request.steering
    if spec is None or spec.coeff == 0.0:
        return None
    layers = sorted(spec.layers if spec.layers is not None else vector_layers)
    return {"adapter": spec.adapter, "coeff": float(spec.coeff), "layers": layers}


def cache_salt(steering: Mapping[str, Any] | None, generation: int) -> str | None:
    """A prefix-cache salt: steering changes every later layer's keys and values, so a steered prompt
    may share cached blocks only with prompts steered the same way by the same load of the adapter."""
    if steering is None:
        return None
    return f"rahf-steer:{steering['adapter']}#{generation}:{steering['coeff']!r}:{steering['layers']}"


def sampling_params(request: GenerationRequest, steering: dict[str, Any] | None) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    p = request.params
    return SamplingParams(
        # vLLM generates at least one token; a scoring-only request (max_tokens 0) drops it on the way out.
        max_tokens=max(p.max_tokens, 1),
        temperature=p.temperature,
        top_p=p.top_p,
        seed=p.seed,
        stop=list(p.stop) or None,
        logprobs=request.logprobs,
        prompt_logprobs=request.prompt_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args={STEERING_KEY: steering} if steering else None,
    )


def token_logprob(token: int, entries: Mapping[int, Any] | None, k: int) -> TokenLogprob:
    """vLLM's {token id: Logprob(logprob, rank)} at one position: the chosen token and the top k."""
    if entries is None:
        return TokenLogprob(token, None)
    top = sorted(((t, e) for t, e in entries.items() if e.rank is not None and e.rank <= k), key=lambda te: te[1].rank)
    return TokenLogprob(token, float(entries[token].logprob), tuple((t, float(e.logprob)) for t, e in top))


def prompt_logprobs(ids: Sequence[int], positions: Sequence[Mapping[int, Any] | None], k: int) -> list[TokenLogprob]:
    """One entry per prompt token; the first has no log-probability (nothing predicts it)."""
    return [token_logprob(int(t), entries if i else None, k) for i, (t, entries) in enumerate(zip(ids, positions,
                                                                                                    strict=True))]
