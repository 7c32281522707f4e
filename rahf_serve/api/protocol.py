"""OpenAI-shaped request schemas, plus rahf-serve's extra body fields (`adapters`, `steering`).

Every field declared here does what the OpenAI spec says, or is refused when given a value this
server cannot honour (a penalty, a logit bias, tools, several choices); an undeclared field is a 400
that names it. Nothing is accepted and then ignored. Responses are plain dicts built in
`responses.py`; only requests need validation.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..blend import BlendKey, blend_key
from ..logprobs import MAX_TOP_LOGPROBS
from ..request import SteeringSpec

MAX_CHARS = 1_000_000
MAX_STOPS, MAX_STOP_CHARS = 16, 256


class _Request(BaseModel):
    # A field the server does not know would otherwise be dropped without a word: refuse it instead.
    model_config = ConfigDict(extra="forbid")


class BlendComponent(_Request):
    name: str = Field(max_length=64)
    weight: float = Field(ge=-100, le=100)


class SteeringRequest(_Request):
    adapter: str = Field(max_length=64)
    coeff: float = Field(ge=-1000, le=1000)
    layers: list[int] | None = Field(default=None, max_length=1024)


class Selection(_Request):
    """Which adapters a generation runs with: a blend and/or steering. Also the body of a preset."""

    adapters: list[BlendComponent] | None = Field(default=None, min_length=1, max_length=16)
    steering: SteeringRequest | None = None

    def blend(self) -> BlendKey | None:
        return blend_key([(c.name, c.weight) for c in self.adapters]) if self.adapters else None

    def steering_spec(self) -> SteeringSpec | None:
        s = self.steering
        return SteeringSpec(s.adapter, s.coeff, tuple(s.layers) if s.layers is not None else None) if s else None

    def describe(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def selection(self) -> Selection:
        """Just these two fields (a request or preset body carries others too)."""
        return Selection(adapters=self.adapters, steering=self.steering)


class StreamOptions(_Request):
    include_usage: bool = False


_ZERO: dict[str, Any] = {"minimum": 0, "maximum": 0}


def _only(value: Any, allowed: Any, field: str, what: str) -> Any:
    if value is not None and value != allowed:
        raise ValueError(f"{field} is not supported by rahf-serve ({what})")
    return value


class _Generation(Selection):
    model: str = Field(max_length=256)
    temperature: float = Field(default=1.0, ge=0, le=10)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] | None = Field(
        default=None, max_length=MAX_STOPS)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=1, description="Only one choice per prompt is supported.")
    user: str | None = Field(default=None, max_length=256,
                             description="An end-user id for the caller's own records; it changes no output.")
    # The spec's "off" values are accepted, so clients that always send them work; others are refused
    # with a message that says why. The schema states the same limits, for clients and fuzzers that read it.
    frequency_penalty: float | None = Field(default=None, description="Only 0 (no penalty) is supported.",
                                            json_schema_extra=_ZERO)
    presence_penalty: float | None = Field(default=None, description="Only 0 (no penalty) is supported.",
                                           json_schema_extra=_ZERO)
    logit_bias: dict[str, float] | None = Field(default=None, description="Only an empty map is supported.",
                                                json_schema_extra={"maxProperties": 0})

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None, info: Any) -> float | None:
        return _only(v, 0, info.field_name, "only 0 is")

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _only(v or None, None, "logit_bias", "only an empty map is")

    @field_validator("stop")
    @classmethod
    def _stop_length(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, str) and len(v) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters")
        return v

    @model_validator(mode="after")
    def _options_need_stream(self) -> _Generation:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] = Field(max_length=MAX_CHARS)

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, v: str | list[dict[str, Any]]) -> str | list[dict[str, Any]]:
        if isinstance(v, str):
            return v
        for part in v:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported: this server serves a "
                                 "text-only model, so only {'type': 'text', 'text': ...} parts are accepted")
            if not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:
                raise ValueError("a text part is exactly {'type': 'text', 'text': <string>}")
        if sum(len(p["text"]) for p in v) > MAX_CHARS:
            raise ValueError(f"content may have at most {MAX_CHARS} characters")
        return v

    def text(self) -> str:
        """The content as one string; text parts are joined by newlines, as vLLM does."""
        return self.content if isinstance(self.content, str) else "\n".join(p["text"] for p in self.content)

    def as_template_input(self) -> dict[str, str]:
        # Chat templates know system, user and assistant; "developer" is OpenAI's newer name for system.
        return {"role": "system" if self.role == "developer" else self.role, "content": self.text()}


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = Field(default=None, description='Only {"type": "text"} is supported.',
                                                   json_schema_extra={"enum": [None, {"type": "text"}]})

    @field_validator("response_format")
    @classmethod
    def _text_format(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        return _only(v, {"type": "text"}, "response_format", 'only {"type": "text"} is')

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_CHARS)]


class CompletionRequest(_Generation):
    prompt: (Annotated[str, Field(min_length=1, max_length=MAX_CHARS)] | TokenIds
             | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_CHARS)]], Field(min_length=1, max_length=1024)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=1024)])
    max_tokens: int | None = Field(default=None, ge=0, description="0 with echo scores the prompt only.")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=1, description="Only 1 is supported.")
    suffix: str | None = Field(default=None, description="Only an empty suffix is supported.",
                               json_schema_extra={"maxLength": 0})

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, v: Any) -> Any:
        # Checked before the union, whose own error would name only its first member ("a valid string").
        def ids(x: Any) -> bool:
            return isinstance(x, list) and bool(x) and all(type(i) is int and i >= 0 for i in x)

        if not (isinstance(v, str) or ids(v) or (isinstance(v, list) and v and (
                all(isinstance(x, str) for x in v) or all(ids(x) for x in v)))):
            raise ValueError("prompt must be a string, a list of strings, a list of token ids (integers >= 0) or "
                             "a list of token-id lists, none of them empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        return _only(v or None, None, "suffix", "only an empty suffix is")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class LoadAdapterRequest(_Request):
    name: str = Field(max_length=256)
    source: str = Field(max_length=1024)


class PresetRequest(Selection):
    name: str = Field(max_length=256)
