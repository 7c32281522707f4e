"""The OpenAI response objects: chat and text completions, whole or as stream chunks, with logprobs.

Text completions use the legacy logprobs object (`tokens`, `token_logprobs`, `top_logprobs` as
{token: logprob} maps that also hold the chosen token, `text_offset`); chat completions use
`logprobs.content`, one {token, logprob, bytes, top_logprobs} per generated token.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from transformers import PreTrainedTokenizerBase

from ..logprobs import TokenLogprob


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, which byte-level BPE vocabularies use."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(b)
        else:
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(range(256), chars, strict=True)}


_BYTE_OF = {c: b for b, c in _bytes_to_unicode().items()}


class TokenText:
    """How a token id appears in logprobs: its text and its exact UTF-8 bytes (a token may hold part of a character)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tok = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token: int) -> str:
        return self._tok.decode([token])

    def _bytes(self, token: int) -> list[int]:
        piece = self._tok.convert_ids_to_tokens(token)
        if self._byte_level and token not in self._tok.all_special_ids and all(c in _BYTE_OF for c in piece):
            return [_BYTE_OF[c] for c in piece]
        return list(self._text(token).encode())


@dataclass
class ChoiceState:
    """What one choice has produced so far (a completion request with several prompts has several)."""

    index: int
    prefix: str = ""
    """Text that precedes the generated text in `text`: the prompt with echo, else nothing."""
    offset: int = 0
    """`text_offset` of the next token: offsets count from the prompt's start, echoed or not, as OpenAI's do."""
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None


def usage(choices: list[ChoiceState]) -> dict[str, Any]:
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.completion_tokens for c in choices)
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    cached = [c.cached_tokens for c in choices if c.cached_tokens is not None]
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": sum(cached)}
    return out


class Shape:
    """The object shapes of one response; `ChatShape` and `CompletionShape` fill in the choices."""

    prefix_id, full_object, chunk_object = "", "", ""

    def __init__(self, model: str, tokens: TokenText) -> None:
        self.model, self.tokens = model, tokens
        self.id = self.prefix_id + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, choices: list[ChoiceState]) -> dict[str, Any]:
        return {**self._envelope(self.full_object, [self.choice(c) for c in choices]), "usage": usage(choices)}

    def chunk(self, state: ChoiceState, text: str, entries: list[TokenLogprob] | None,
              finish: str | None) -> dict[str, Any]:
        return self._envelope(self.chunk_object, [self.delta(state, text, entries, finish)])

    def usage_chunk(self, choices: list[ChoiceState]) -> dict[str, Any]:
        return {**self._envelope(self.chunk_object, []), "usage": usage(choices)}

    def opening(self) -> list[dict[str, Any]]:
        """Chunks sent before any token (chat announces the assistant role)."""
        return []

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, state: ChoiceState, text: str, entries: list[TokenLogprob] | None,
              finish: str | None) -> dict[str, Any]:
        raise NotImplementedError


class ChatShape(Shape):
    prefix_id, full_object, chunk_object = "chatcmpl-", "chat.completion", "chat.completion.chunk"

    def _content(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        t = self.tokens
        return {"content": [{"token": t.text(e.token), "logprob": e.logprob, "bytes": t.bytes(e.token),
                             "top_logprobs": [{"token": t.text(i), "logprob": lp, "bytes": t.bytes(i)} for i, lp in e.top]}
                            for e in entries], "refusal": None}

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        return {"index": state.index, "message": {"role": "assistant", "content": "".join(state.text)},
                "logprobs": self._content(state.logprobs), "finish_reason": state.finish}

    def opening(self) -> list[dict[str, Any]]:
        return [self._envelope(self.chunk_object, [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}])]

    def delta(self, state: ChoiceState, text: str, entries: list[TokenLogprob] | None,
              finish: str | None) -> dict[str, Any]:
        return {"index": state.index, "delta": {"content": text} if text else {},
                "logprobs": self._content(entries), "finish_reason": finish}


class CompletionShape(Shape):
    prefix_id, full_object, chunk_object = "cmpl-", "text_completion", "text_completion"

    def _legacy(self, state: ChoiceState, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The legacy logprobs object for `entries`, advancing the choice's text offset past them."""
        if entries is None:
            return None
        t = self.tokens
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(t.text(e.token))
            out["token_logprobs"].append(e.logprob)
            # The spec's top map holds the chosen token too: up to k + 1 entries.
            out["top_logprobs"].append(None if e.logprob is None else
                                       {**{t.text(i): lp for i, lp in e.top}, t.text(e.token): e.logprob})
            out["text_offset"].append(state.offset)
            state.offset += len(t.text(e.token))
        return out

    def choice(self, state: ChoiceState) -> dict[str, Any]:
        return {"index": state.index, "text": state.prefix + "".join(state.text),
                "logprobs": self._legacy(state, state.logprobs), "finish_reason": state.finish}

    def delta(self, state: ChoiceState, text: str, entries: list[TokenLogprob] | None,
              finish: str | None) -> dict[str, Any]:
        return {"index": state.index, "text": text, "logprobs": self._legacy(state, entries), "finish_reason": finish}
