"""OpenAI-shaped request schemas, plus rahf-serve's extra body fields (`adapters`, `steering`).

Responses are plain dicts built in `serving.py`; only requests need validation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Unknown OpenAI fields (logprobs, user, ...) are ignored as vLLM does, not rejected.
    model_config = ConfigDict(extra="ignore")


class BlendComponent(_Request):
    name: str = Field(max_length=64)
    weight: float = Field(ge=-100, le=100)


class SteeringRequest(_Request):
    adapter: str = Field(max_length=64)
    coeff: float = Field(ge=-1000, le=1000)
    layers: list[int] | None = Field(default=None, max_length=1024)


class StreamOptions(_Request):
    include_usage: bool = False


class _Generation(_Request):
    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(default=None)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per request is supported.")
    adapters: list[BlendComponent] | None = Field(default=None, min_length=1, max_length=16)
    steering: SteeringRequest | None = None

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(s[:256] for s in stops[:16])


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=1_000_000)


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionRequest(_Generation):
    prompt: str = Field(min_length=1, max_length=1_000_000)


class LoadAdapterRequest(_Request):
    name: str = Field(max_length=256)
    source: str = Field(max_length=1024)
