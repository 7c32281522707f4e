"""Log-probabilities of tokens under the model of one batch row, taken from that row's own forward pass.

Generated tokens are scored from the logits the engine samples from; prompt tokens (echo) from the
final hidden states of the prefill, captured by a hook on the decoder and sent through the output
head one row (and one chunk of positions) at a time, so a batch of long prompts never holds a
[batch, length, vocab] tensor. Values are the model's own distribution, before temperature or top-p,
normalised in float64: over a 49k vocabulary a float32 log-softmax is off by ~1e-5 per token, always
in the same direction, and a harness sums hundreds of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

MAX_TOP_LOGPROBS = 20
"""Most alternatives per position a request may ask for (OpenAI's chat limit; vLLM's default)."""

CHUNK = 256
"""Prompt positions sent through the output head at once: 256 x 49k vocab x 8 bytes = 100 MB."""


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float | None
    """log p(token | everything before it); None for a prompt's first token, which nothing predicts."""
    top: tuple[tuple[int, float], ...] = ()
    """The most likely tokens at this position with their log-probabilities, most likely first."""


def _entries(logp: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """logp [n, vocab] log-softmaxed rows; row j scores tokens[j]."""
    index = torch.tensor(list(tokens), device=logp.device)[:, None]
    chosen = logp.gather(1, index)[:, 0].tolist()
    if k > 0:
        values, ids = logp.topk(k, dim=-1)
        tops = [tuple(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [()] * len(tokens)
    return [TokenLogprob(t, lp, top) for t, lp, top in zip(tokens, chosen, tops, strict=True)]


def next_token(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The entry of `token` drawn from one row's next-token `logits` [vocab]."""
    return _entries(F.log_softmax(logits.double()[None], dim=-1), [token], k)[0]


def prompt_tokens(hidden: torch.Tensor, head: torch.nn.Module, ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Entries for every token of a prompt from its final hidden states `hidden` [len(ids), hidden]."""
    out = [TokenLogprob(int(ids[0]), None)]
    # Position j predicts token j + 1; the last position predicts the first generated token.
    for start in range(0, len(ids) - 1, CHUNK):
        stop = min(start + CHUNK, len(ids) - 1)
        logp = F.log_softmax(head(hidden[start:stop]).double(), dim=-1)
        out += _entries(logp, [int(t) for t in ids[start + 1:stop + 1]], k)
    return out


def output_head(model: Any) -> torch.nn.Module:
    """The module that turns final hidden states into logits (the LM head), through a PEFT wrapper."""
    head = model.get_output_embeddings()
    if head is None:
        raise TypeError(f"{type(model).__name__} has no output embeddings to score prompt tokens with")
    if hasattr(head, "lora_A"):
        # Per-row adapters act only inside the PEFT forward; a head called outside it would be the base's.
        raise TypeError("prompt log-probabilities are not available when an adapter adapts the output head")
    return head


@contextmanager
def final_hidden(model: Any) -> Iterator[list[torch.Tensor]]:
    """Collects the decoder's last hidden states [batch, length, hidden] of each forward pass inside."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    captured: list[torch.Tensor] = []

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = root.get_decoder().register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
