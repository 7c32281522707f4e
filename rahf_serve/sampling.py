"""Per-request sampling (temperature, top-p, seed) and incremental detokenization with stop strings.

Each request owns its `torch.Generator`, so a seeded request draws the same tokens whether it runs
alone or shares a batch with others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    """Most tokens to generate (the prompt does not count); 0 only scores the prompt (echo)."""
    temperature: float = 1.0
    """0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first occurrence of any of these strings; it is not returned."""
    seed: int | None = None
    """Seeds this request's own generator; None draws from a random seed."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                generators: Sequence[torch.Generator]) -> list[int]:
    """One next token per row of `logits` [batch, vocab], each row under its own parameters."""
    # One batched argmax serves every greedy row; only sampled rows pay for softmax and sorting.
    chosen = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if not p.greedy:
            chosen[row] = _sample_one(logits[row], p, gen)
    return chosen


MIN_TEMPERATURE = 1e-30
"""well inside float32's normal range (1.2e-38), and small enough to pick the top token"""


def _sample_one(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> int:
    logits = logits.float()
    # A tiny temperature (1e-100 is valid input) made logits / t overflow to inf - inf = NaN, or t
    # itself rounded to 0 in float32. Shifted so the top logit is 0, and with t kept representable,
    # the top token gets probability ~1 and the rest ~0: the greedy limit, as it should be.
    probs = torch.softmax((logits - logits.max()) / max(p.temperature, MIN_TEMPERATURE), dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep a token while the mass before it is below top_p: the top token always survives.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < p.top_p
        keep[0] = True  # explicitly: a top_p below float32's range (1e-300 is valid input) compares as 0
        sorted_probs = sorted_probs * keep
        return int(order[torch.multinomial(sorted_probs, 1, generator=gen)])
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Turns a growing list of token ids into text deltas, withholding what could start a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        """Text emitted so far (what the client has seen)."""

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (new text safe to emit, whether a stop string ended the generation)."""
        self._ids.append(token_id)
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        for stop in self._stop:
            at = full.find(stop, max(0, self._emitted - len(stop) + 1))
            if at >= 0:
                return self._emit(full[:at]), True
        if full.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return "", False
        return self._emit(full[: len(full) - self._holdback(full)]), False

    def flush(self) -> str:
        """Everything not yet emitted, at the end of a generation that no stop string ended."""
        return self._emit(self._tokenizer.decode(self._ids, skip_special_tokens=True))

    def _holdback(self, full: str) -> int:
        """Length of the longest suffix of `full` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(full)), best, -1):
                if full.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _emit(self, upto: str) -> str:
        delta = upto[self._emitted:] if len(upto) > self._emitted else ""
        self._emitted = max(self._emitted, len(upto))
        self.text += delta
        return delta
