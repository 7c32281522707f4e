"""Turn OpenAI requests into engine requests and engine events into JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..blend import blend_key
from ..engine import Engine
from ..errors import ModelNotFound, RahfError
from ..request import GenerationRequest, RequestHandle, SteeringSpec, StreamEvent
from ..sampling import SamplingParams
from .errors import error_body, from_exception
from .protocol import ChatCompletionRequest, CompletionRequest, _Generation

DEFAULT_MAX_TOKENS = 256


class OpenAIServing:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        messages = [m.model_dump() for m in body.messages]
        # In a worker thread: a megabyte prompt takes over a second to tokenize, and on the event
        # loop that would stall every other stream and /health meanwhile.
        ids = await asyncio.to_thread(self._chat_ids, messages)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await self._serve(body, ids, max_tokens, request, chat=True)

    async def completion(self, body: CompletionRequest, request: Request) -> Any:
        ids = await asyncio.to_thread(lambda: self.engine.tokenizer(body.prompt)["input_ids"])
        return await self._serve(body, ids, body.max_tokens, request, chat=False)

    def _chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def to_engine(self, body: _Generation, prompt_ids: list[int], max_tokens: int | None) -> GenerationRequest:
        if body.model == self.engine.base.name:
            adapter = None
        elif body.model in self.engine.adapters:
            adapter = body.model
        else:
            raise ModelNotFound(f"model {body.model!r} is neither the base ({self.engine.base.name}) nor a loaded "
                                f"adapter; GET /v1/models lists them")
        params = SamplingParams(max_tokens=max_tokens or min(DEFAULT_MAX_TOKENS, self.engine.max_new_tokens),
                                temperature=body.temperature, top_p=body.top_p, stop=body.stop_list(), seed=body.seed)
        blend = blend_key([(c.name, c.weight) for c in body.adapters]) if body.adapters else None
        steering = (SteeringSpec(body.steering.adapter, body.steering.coeff,
                                 tuple(body.steering.layers) if body.steering.layers is not None else None)
                    if body.steering else None)
        return GenerationRequest(prompt_ids, params, adapter, blend, steering)

    async def _serve(self, body: _Generation, ids: list[int], max_tokens: int | None, request: Request,
                     *, chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StreamEvent] = asyncio.Queue()

        def sink(event: StreamEvent) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                handle.cancel()

        handle = self.engine.submit(self.to_engine(body, ids, max_tokens), sink)
        shape = _Shape(body.model, chat)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, handle, shape, include_usage), media_type="text/event-stream")
        return await _collect(events, handle, shape, request)


class _Shape:
    """The OpenAI object shapes of one response (chat or text completion)."""

    def __init__(self, model: str, chat: bool) -> None:
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def full(self, text: str, finish: str, usage: dict[str, int]) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            return {**self._envelope("chat.completion", [choice]), "usage": usage}
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {**self._envelope("text_completion", [choice]), "usage": usage}

    def chunk(self, text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "finish_reason": finish}])
        return self._envelope("text_completion", [{"index": 0, "text": text or "", "finish_reason": finish,
                                                   "logprobs": None}])

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": usage}


def _usage(event: StreamEvent) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(events: asyncio.Queue[StreamEvent], handle: RequestHandle, shape: _Shape,
               include_usage: bool) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield _data(shape.chunk(None, None, first=True))
        while True:
            event = await events.get()
            if event.error is not None:
                yield _data(error_body(event.error.status, str(event.error), event.error.code))
                break
            if event.text or event.finish_reason:
                yield _data(shape.chunk(event.text, event.finish_reason))
            if event.finish_reason is not None:
                if include_usage:
                    yield _data(shape.usage_chunk(_usage(event)))
                break
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the client disconnects too (Starlette cancels the stream): stop generating for it.
        handle.cancel()


async def _collect(events: asyncio.Queue[StreamEvent], handle: RequestHandle, shape: _Shape,
                   request: Request) -> JSONResponse:
    text = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                continue
            if event.error is not None:
                return from_exception(event.error)
            text.append(event.text)
            if event.finish_reason is not None:
                if event.finish_reason == "cancelled":
                    return from_exception(RahfError("the generation was cancelled"))
                return JSONResponse(shape.full("".join(text), event.finish_reason, _usage(event)))
    finally:
        handle.cancel()
