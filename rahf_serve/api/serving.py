"""Turn OpenAI requests into engine requests and engine events into JSON or server-sent events.

A text completion with several prompts becomes several engine requests submitted together, so the
engine prefills and decodes them in the same batch; their events meet in one queue, tagged by choice.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine_api import ServingEngine
from ..errors import InvalidRequest, ModelNotFound, RahfError, RequestTooLarge
from ..registry import AdapterRegistry
from ..request import GenerationRequest, RequestHandle, StreamEvent
from ..sampling import SamplingParams
from .errors import error_body, from_exception
from .protocol import ChatCompletionRequest, CompletionRequest, _Generation
from .responses import ChatShape, ChoiceState, CompletionShape, Shape, TokenText

DEFAULT_MAX_TOKENS = 256
Tagged = tuple[int, StreamEvent]


class OpenAIServing:
    def __init__(self, engine: ServingEngine, registry: AdapterRegistry) -> None:
        self.engine = engine
        self.registry = registry
        self.tokens = TokenText(engine.tokenizer)

    async def chat(self, body: ChatCompletionRequest, request: Request) -> Any:
        messages = [m.as_template_input() for m in body.messages]
        # In a worker thread: a megabyte prompt takes over a second to tokenize, and on the event
        # loop that would stall every other stream and /health meanwhile.
        ids = await asyncio.to_thread(self._chat_ids, messages)
        top = (body.top_logprobs or 0) if body.logprobs else None
        engine_request = self.to_engine(body, ids, body.max_completion_tokens or body.max_tokens, logprobs=top)
        return await self._serve(body, [engine_request], [ChoiceState(0)], ChatShape(body.model, self.tokens),
                                 request)

    async def completion(self, body: CompletionRequest, request: Request) -> Any:
        prompts = body.prompts()
        if len(prompts) > self.engine.max_queue:
            raise RequestTooLarge(f"{len(prompts)} prompts in one request; this server queues at most "
                                  f"{self.engine.max_queue}")
        ids = await asyncio.to_thread(self._completion_ids, prompts)
        scored = body.logprobs if body.echo else None
        requests = [self.to_engine(body, p, body.max_tokens, logprobs=body.logprobs, prompt_logprobs=scored)
                    for p in ids]
        for r in requests:  # before decoding them: ids outside the vocabulary are the client's error, a 400
            self.engine.validate(r)
        choices = []
        for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
            text = prompt if isinstance(prompt, str) else self.engine.tokenizer.decode(prompt_ids)
            choices.append(ChoiceState(i, prefix=text if body.echo else "", offset=0 if body.echo else len(text)))
        return await self._serve(body, requests, choices, CompletionShape(body.model, self.tokens), request)

    def _chat_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        text = self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.engine.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _completion_ids(self, prompts: Sequence[str | list[int]]) -> list[list[int]]:
        return [self.engine.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]

    def to_engine(self, body: _Generation, prompt_ids: list[int], max_tokens: int | None, *,
                  logprobs: int | None = None, prompt_logprobs: int | None = None) -> GenerationRequest:
        """The engine request for one prompt: `model` and the extra body fields resolved to adapters."""
        selection = body.selection()
        blend, steering = selection.blend(), selection.steering_spec()
        adapter = None
        preset = self.registry.preset(body.model)
        if preset is not None:
            if blend or steering:
                raise InvalidRequest(f"model {body.model!r} is a preset (its own adapters and steering): "
                                     "send `adapters`/`steering` with the base or an adapter instead")
            blend, steering = preset.blend, preset.steering
        elif body.model in self.engine.adapters:
            adapter = body.model
        elif body.model != self.engine.base.name:
            raise ModelNotFound(f"model {body.model!r} is neither the base ({self.engine.base.name}), a loaded "
                                "adapter nor a preset; GET /v1/models lists them")
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, self.engine.max_new_tokens)
        params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                                stop=body.stop_list(), seed=body.seed)
        return GenerationRequest(prompt_ids, params, adapter, blend, steering, logprobs, prompt_logprobs)

    async def _serve(self, body: _Generation, requests: list[GenerationRequest], choices: list[ChoiceState],
                     shape: Shape, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Tagged] = asyncio.Queue()
        handles: list[RequestHandle] = []

        def sink_for(index: int) -> Any:
            def sink(event: StreamEvent) -> None:
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (index, event))
                except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
                    for h in handles:
                        h.cancel()

            return sink

        # All or none, and queued together, so the engine prefills the prompts of one request in one batch.
        # Off the event loop: an engine may write files to submit (vLLM's first use of a blend writes its
        # LoRA folder), and every other stream's tokens wait while the loop is blocked.
        handles += await asyncio.to_thread(self.engine.submit_many, requests,
                                           [sink_for(i) for i in range(len(requests))])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(events, handles, choices, shape, include_usage),
                                     media_type="text/event-stream")
        return await _collect(events, handles, choices, shape, request)


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _take(state: ChoiceState, event: StreamEvent) -> tuple[str, list[Any] | None]:
    """Record `event` in its choice; returns the text and logprob entries it adds (the echo on the first)."""
    text = ("" if state.text else state.prefix) + event.text
    entries = None
    if event.prompt_logprobs is not None or event.logprobs is not None:
        entries = (event.prompt_logprobs or []) + (event.logprobs or [])
        state.logprobs = (state.logprobs or []) + entries
    state.text.append(event.text)
    state.finish = event.finish_reason
    state.prompt_tokens, state.completion_tokens = event.prompt_tokens, event.completion_tokens
    if event.cached_tokens is not None:
        state.cached_tokens = event.cached_tokens
    return text, entries


async def _sse(events: asyncio.Queue[Tagged], handles: list[RequestHandle], choices: list[ChoiceState],
               shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    try:
        for chunk in shape.opening():
            yield _data(chunk)
        running = len(choices)
        while running:
            index, event = await events.get()
            if event.error is not None:
                yield _data(error_body(event.error.status, str(event.error), event.error.code))
                break
            state = choices[index]
            text, entries = _take(state, event)
            if text or entries or event.finish_reason:
                yield _data(shape.chunk(state, text, entries, event.finish_reason))
            running -= event.finish_reason is not None
        else:
            if include_usage:
                yield _data(shape.usage_chunk(choices))
        yield "data: [DONE]\n\n"
    finally:
        # Runs when the client disconnects too (Starlette cancels the stream): stop generating for it.
        for h in handles:
            h.cancel()


async def _collect(events: asyncio.Queue[Tagged], handles: list[RequestHandle], choices: list[ChoiceState],
                   shape: Shape, request: Request) -> JSONResponse:
    try:
        running = len(choices)
        while running:
            try:
                index, event = await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    for h in handles:
                        h.cancel()
                continue
            if event.error is not None:
                return from_exception(event.error)
            if event.finish_reason == "cancelled":
                return from_exception(RahfError("the generation was cancelled"))
            _take(choices[index], event)
            running -= event.finish_reason is not None
        return JSONResponse(shape.full(choices))
    finally:
        for h in handles:
            h.cancel()
