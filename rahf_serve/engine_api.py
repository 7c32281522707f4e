"""What the API, the registry and the arena need from an engine, whichever one generates.

Two engines implement it: the built-in `engine.Engine` (transformers, one process, LoRA slots and
steering hooks of our own) and `vllm_engine.VllmEngine` (vLLM's scheduler, paged attention and punica
LoRA kernels, for bases that need several GPUs). Callers type against `ServingEngine` only, so that
choosing vLLM never imports it unless asked, and the built-in engine's imports stay out of the API.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from .blend import BlendKey
from .bundle import Bundle
from .metrics import ServingMetrics
from .request import GenerationRequest, Limits, RequestHandle, Sink, SteeringSpec, StreamEvent


class ServedBase(Protocol):
    """The base model as the API shows it; `models.BaseModel` is one."""

    name: str
    """served name (`model` in requests) and the id adapters record as their base"""
    hub_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def fingerprint(self) -> dict[str, Any]: ...


@runtime_checkable
class ServingEngine(Protocol):
    """Generation behind the OpenAI API: adapters attached by name, requests streamed to sinks.

    Every method may be called from any thread; sinks are called on the engine's own thread and must
    return quickly. Errors are `RahfError`s, so the API maps them to status codes.
    """

    base: Any
    """a `ServedBase`"""
    tokenizer: Any
    """the base's `PreTrainedTokenizerBase` (chat template, prompt encoding)"""
    metrics: ServingMetrics
    max_queue: int
    max_new_tokens: int
    max_lora_rank: int

    @property
    def adapters(self) -> list[str]: ...

    @property
    def limits(self) -> Limits: ...

    def validate(self, request: GenerationRequest) -> None:
        """Raise unless the request can run here: its fields, what it names, what this engine supports."""

    def validate_selection(self, adapter: str | None, blend: BlendKey | None,
                           steering: SteeringSpec | None) -> None:
        """Raise unless every adapter named is loaded and the blend and steering are servable here."""

    def attach_adapter(self, name: str, bundle: Bundle) -> None:
        """Serve a read and validated bundle as adapter `name`."""

    def detach_adapter(self, name: str) -> None:
        """Stop serving adapter `name`; requests that use it end with an `adapter_removed` error."""

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle: ...

    def submit_many(self, requests: Sequence[GenerationRequest], sinks: Sequence[Sink]) -> list[RequestHandle]:
        """Queue requests that arrived together: all or none."""

    def generate(self, request: GenerationRequest, timeout: float = 600.0) -> StreamEvent:
        """Blocking: the whole generation as one event."""

    def start(self) -> Any: ...

    def stop(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> None: ...


T = TypeVar("T")

ControlQueue = queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]]
"""Operations (adapter loads and unloads) that callers hand to an engine's own thread."""


def call_on_engine_thread(fn: Callable[[], T], engine_thread: threading.Thread | None, control: ControlQueue,
                          wake: threading.Event, timeout: float | None) -> T:
    """Run `fn` on the engine's thread between two steps: directly when the engine is not running or
    this is its thread, else queued on `control` (the engine runs it with `run_control`)."""
    if engine_thread is None or threading.current_thread() is engine_thread:
        return fn()
    future: Future[T] = Future()
    control.put((fn, future))
    wake.set()
    return future.result(timeout)


def run_control(control: ControlQueue) -> None:
    """Run every queued operation on the calling (engine) thread; results and errors go to their futures."""
    while not control.empty():
        fn, future = control.get()
        try:
            future.set_result(fn())
        except BaseException as err:  # noqa: B036 - handed to the caller's thread
            future.set_exception(err)


def drain(q: queue.SimpleQueue[T]) -> list[T]:
    """Everything in `q`, taken out (at shutdown: the requests that never started)."""
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def collect(engine: ServingEngine, request: GenerationRequest, timeout: float = 600.0) -> StreamEvent:
    """Submit `request` and wait for its end: its events summed into one (text, ids, log-probs, usage)."""
    events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
    engine.submit(request, events.put)
    total = StreamEvent()
    while total.finish_reason is None:
        event = events.get(timeout=timeout)
        total.text += event.text
        total.token_ids += event.token_ids
        if event.logprobs is not None:
            total.logprobs = (total.logprobs or []) + event.logprobs
        total.prompt_logprobs = total.prompt_logprobs or event.prompt_logprobs
        total.finish_reason, total.error = event.finish_reason, event.error
        total.prompt_tokens, total.completion_tokens = event.prompt_tokens, event.completion_tokens
    return total
