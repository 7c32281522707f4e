"""`VllmEngine`: the serving interface over vLLM's LLMEngine, stepped by one thread that owns it.

Every vLLM call (start, add/abort request, step, LoRA load/unload, worker RPCs) happens on that thread;
other threads validate requests and queue them or queue control operations, as with the built-in engine.
An adapter is a vLLM LoRARequest on its bundle folder; an exact blend is a concatenated-rank LoRA folder
written once to the cache (`blends.py`) and registered like an adapter; steering rides in each request's
`extra_args` to the worker extension (`steering.py`) that adds it to that request's tokens only. Streams
are token by token (vLLM's DELTA outputs); a cancelled handle aborts the vLLM request.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..blend import BlendKey, blend_name
from ..bundle import Bundle, check_fits
from ..engine_api import ControlQueue, call_on_engine_thread, collect, drain, run_control
from ..errors import (
    AdapterRemoved,
    BundleError,
    EngineStopped,
    InvalidRequest,
    LimitExceeded,
    ModelNotFound,
    QueueFull,
    RahfError,
)
from ..lora_slots import LoraWeights, read_lora
from ..metrics import ServingMetrics
from ..models import BaseModel, cache_root
from ..request import GenerationRequest, Limits, RequestHandle, Sink, SteeringSpec, StreamEvent, check_request
from ..selection import check_blend, steering_layers
from . import convert
from .blends import blend_digest, bundle_digest, write_blend
from .options import VllmOptions

log = logging.getLogger(__name__)
T = TypeVar("T")
ENGINE = "the vLLM engine (--engine vllm)"
DEFAULT_MAX_MODEL_LEN = 4096


class UnsupportedByEngine(InvalidRequest):
    """A request this engine cannot honour exactly; refused rather than served differently."""

    code = "unsupported_by_engine"


@dataclass
class _Loaded:
    lora: LoraWeights
    """host-memory factors, for building blends"""
    path: Path
    lora_id: int
    """vLLM's id of this load of the adapter (a reload under the same name gets a new one)"""
    digest: str
    vectors: dict[int, torch.Tensor]
    """steering vectors (host memory), copied to every worker when registered"""

    @property
    def vector_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.vectors))


@dataclass
class _Stream:
    request: GenerationRequest
    handle: RequestHandle
    sink: Sink
    submitted: float
    lora: tuple[str, int, Path] | None = None
    """(name, vLLM id, folder) of its adapter; None for the base and for blends (`blend_path`)"""
    blend_path: Path | None = None
    uses: frozenset[str] = frozenset()
    """adapters this stream needs (its adapter, blend components, steering adapter)"""
    generated: int = 0
    started: bool = False
    last_time: float = 0.0
    steering: dict[str, Any] | None = field(default=None)
    done: bool = False

    @property
    def rid(self) -> str:
        return str(self.handle.id)


class VllmEngine:
    def __init__(self, base: BaseModel, options: VllmOptions | None = None, *, max_queue: int = 64,
                 max_new_tokens: int = 1024, metrics: ServingMetrics | None = None,
                 blend_dir: Path | None = None) -> None:
        """`base` from `models.load_base_skeleton` (vLLM loads the weights from `base.path`)."""
        self.base = base
        self.tokenizer = base.tokenizer
        self.options = options or VllmOptions()
        self.max_queue = max_queue
        self.max_new_tokens = max_new_tokens
        self.max_lora_rank = self.options.max_lora_rank
        context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        self.max_model_len = self.options.max_model_len or min(context, DEFAULT_MAX_MODEL_LEN)
        self.metrics = metrics or ServingMetrics()
        self.blend_dir = blend_dir or cache_root() / "vllm-blends"
        self._loaded: dict[str, _Loaded] = {}
        self._blends: dict[str, tuple[Any, frozenset[str]]] = {}
        """blend folder digest -> (LoRARequest, component names)"""
        self._lora_ids = itertools.count(1)
        self._pending: queue.SimpleQueue[_Stream] = queue.SimpleQueue()
        self._control: ControlQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._inflight = 0
        self._counting = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._llm: Any = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> VllmEngine:
        """Start vLLM on the engine thread and return once it serves (or raise why it could not). Adapters
        attached before are registered now; one that vLLM refuses fails the start."""
        if self._thread is None:
            self._stopping = False
            ready: Future[None] = Future()
            self._thread = threading.Thread(target=self._run, args=(ready,), name="rahf-vllm", daemon=True)
            self._thread.start()
            try:
                ready.result()
            except BaseException:
                self._thread.join(timeout=30)
                self._thread = None
                raise
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def __enter__(self) -> VllmEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: Future[None]) -> None:
        try:
            self._llm = self._build()
            self._llm.collective_rpc("rahf_install_steering")
            for name, loaded in self._loaded.items():  # attached before start
                self._register(name, loaded)
        except BaseException as err:  # noqa: B036 - handed to start()'s caller
            ready.set_exception(err if isinstance(err, Exception) else RahfError(str(err)))
            self._shutdown()
            return
        ready.set_result(None)
        try:
            self._loop()
        finally:
            for stream in list(self._streams.values()) + drain(self._pending):
                self._fail(stream, EngineStopped("the server is shutting down"))
            self._streams.clear()
            self._shutdown()

    def _build(self) -> Any:
        try:
            from vllm import EngineArgs, LLMEngine
        except ImportError as err:
            raise RahfError(f"--engine vllm needs vLLM in this Python environment ({err}); vLLM pins its own "
                            "torch and transformers, so give it an environment of its own: "
                            "scripts/setup_vllm_cpu.sh (CPU) or docs/scale.md (GPUs)") from None

        dtype = str(self.base.dtype).removeprefix("torch.")
        kwargs = self.options.engine_kwargs(str(self.base.path), self.base.name, dtype, self.max_model_len)
        log.info("starting vLLM: %s", {k: v for k, v in kwargs.items() if k not in ("model", "tokenizer")})
        return LLMEngine.from_engine_args(EngineArgs(**kwargs))

    def _shutdown(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            shutdown = getattr(getattr(llm, "engine_core", None), "shutdown", None)
            if shutdown is not None:
                shutdown()

    # ------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        return list(self._loaded)

    def attach_adapter(self, name: str, bundle: Bundle) -> None:
        """Check the bundle against the base, then register it with vLLM (which reads its folder)."""
        check_fits(bundle, self.base.model, self.base.fingerprint, self.base.name)
        lora = read_lora(bundle, name)
        if lora.rank > self.max_lora_rank:
            raise LimitExceeded(f"adapter {name!r} has LoRA rank {lora.rank}, above --max-lora-rank "
                                f"{self.max_lora_rank} of {ENGINE}; restart with a larger --max-lora-rank")

        def op() -> None:
            if name in self._loaded:
                raise RahfError(f"adapter {name!r} is already loaded")
            loaded = _Loaded(lora, bundle.path, next(self._lora_ids), bundle_digest(bundle),
                             {k: v.float() for k, v in bundle.vectors.items()})
            if self._llm is not None:  # else registered when the engine starts
                self._register(name, loaded)
            self._loaded[name] = loaded
            self.metrics.adapters_loaded.set(len(self._loaded))

        self.call(op)

    def _register(self, name: str, loaded: _Loaded) -> None:
        try:
            self._llm.add_lora(_lora_request(name, loaded.lora_id, loaded.path))
        except Exception as err:
            raise BundleError(f"{ENGINE} could not load adapter {name!r}: {err}") from err
        if loaded.vectors:
            vectors = {layer: v.tolist() for layer, v in loaded.vectors.items()}
            self._llm.collective_rpc("rahf_set_vectors", args=(name, vectors))

    def detach_adapter(self, name: str) -> None:
        """Unload `name`; requests that use it (as adapter, blend part or steering) end with adapter_removed."""

        def op() -> None:
            if name not in self._loaded:
                raise ModelNotFound(f"adapter {name!r} is not loaded")
            for stream in [s for s in self._streams.values() if name in s.uses]:
                self._abort(stream)
                self._fail(stream, AdapterRemoved(f"adapter {name!r} was unloaded during generation"))
            loaded = self._loaded.pop(name)
            if self._llm is not None:
                for digest, (request, parts) in list(self._blends.items()):
                    if name in parts:
                        self._llm.remove_lora(request.lora_int_id)
                        del self._blends[digest]
                self._llm.remove_lora(loaded.lora_id)
                self._llm.collective_rpc("rahf_drop_vectors", args=(name,))
            self.metrics.adapters_loaded.set(len(self._loaded))

        self.call(op)

    def call(self, fn: Callable[[], T], timeout: float | None = 300.0) -> T:
        """Run `fn` on the engine thread between two steps (directly, if the engine is not running)."""
        return call_on_engine_thread(fn, self._thread, self._control, self._wake, timeout)

    # ------------------------------------------------------------ requests

    @property
    def limits(self) -> Limits:
        return Limits(int(self.base.fingerprint["vocab_size"]), self.max_new_tokens, self.max_model_len)

    def validate(self, request: GenerationRequest) -> None:
        check_request(request, self.limits)
        self.validate_selection(request.adapter, request.blend, request.steering)

    def validate_selection(self, adapter: str | None, blend: BlendKey | None, steering: SteeringSpec | None) -> None:
        loaded = dict(self._loaded)  # a copy: an unload on the engine thread must not pull names from under us
        check_blend(adapter, blend, {n: a.lora for n, a in loaded.items()}, self.max_lora_rank, f" of {ENGINE}")
        if steering is None:
            return
        steering_layers(steering, {n: a.vector_layers for n, a in loaded.items()})
        if not self.options.steering and steering.coeff != 0.0:
            raise UnsupportedByEngine(f"steering is off in {ENGINE}: it was started with --vllm-compile "
                                      "(torch.compile / CUDA graphs), and steering hooks need an eager model; "
                                      "restart without --vllm-compile to steer")

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        return self.submit_many([request], [sink])[0]

    def submit_many(self, requests: Sequence[GenerationRequest], sinks: Sequence[Sink]) -> list[RequestHandle]:
        if self._thread is None:
            raise EngineStopped("the engine is not running: start it (engine.start() or `with engine:`)")
        streams = []
        now = time.perf_counter()
        for request, sink in zip(requests, sinks, strict=True):
            self.validate(request)
            streams.append(self._stream(request, sink, now))
        with self._counting:
            if self._inflight + len(streams) > self.options.max_num_seqs + self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            self._inflight += len(streams)
        for stream in streams:
            self._pending.put(stream)
        self._wake.set()
        return [s.handle for s in streams]

    def _stream(self, request: GenerationRequest, sink: Sink, now: float) -> _Stream:
        """A stream with its blend folder written (here, on the caller's thread, which the API keeps off its
        event loop: it reads and writes files)."""
        loaded = dict(self._loaded)
        uses = {request.adapter} if request.adapter else set()
        stream = _Stream(request, RequestHandle(), sink, now)
        if request.adapter is not None:
            stream.lora = (request.adapter, loaded[request.adapter].lora_id, loaded[request.adapter].path)
        elif request.blend:
            uses |= {n for n, _ in request.blend}
            digest = blend_digest([(loaded[n].digest, w) for n, w in request.blend])
            stream.blend_path = write_blend(self.blend_dir, digest, [(loaded[n].lora, w) for n, w in request.blend],
                                            self.base.hub_id)
        if request.steering is not None:
            uses.add(request.steering.adapter)
            stream.steering = convert.steering_args(request, loaded[request.steering.adapter].vector_layers)
        stream.uses = frozenset(uses)
        return stream

    def generate(self, request: GenerationRequest, timeout: float = 600.0) -> StreamEvent:
        return collect(self, request, timeout)

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while not self._stopping:
            try:
                run_control(self._control)
                self._admit()
                self._reap_cancelled()
                if self._streams:
                    for output in self._llm.step():
                        stream = self._streams.get(output.request_id)
                        if stream is not None:
                            self._deliver(stream, output)
                else:
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                self._gauges()
            except Exception as err:  # keep serving: fail the requests in flight, not the process
                log.exception("vLLM step failed")
                for stream in list(self._streams.values()):
                    self._abort(stream)
                    self._fail(stream, RahfError(f"generation failed in {ENGINE}: {err}"))

    def _admit(self) -> None:
        from vllm.inputs.engine import tokens_input

        while not self._pending.empty():
            stream = self._pending.get()
            if stream.handle.cancelled:
                self._cancel(stream)
                continue
            try:
                missing = sorted(stream.uses - set(self._loaded))
                if missing:  # unloaded while this request waited
                    raise AdapterRemoved(f"adapter {missing[0]!r} was unloaded before generation started")
                lora = _lora_request(*stream.lora) if stream.lora else None
                if stream.blend_path is not None:
                    lora = self._blend_request(stream)
                generation = self._loaded[stream.request.steering.adapter].lora_id if stream.steering else 0
                prompt = tokens_input(list(stream.request.prompt_ids),
                                      cache_salt=convert.cache_salt(stream.steering, generation))
                self._streams[stream.rid] = stream
                self._llm.add_request(stream.rid, prompt, convert.sampling_params(stream.request, stream.steering),
                                      lora_request=lora)
            except RahfError as err:
                self._streams.pop(stream.rid, None)
                self._fail(stream, err)
            except Exception as err:  # one bad request must not take the running batch down
                log.exception("starting request %s failed", stream.rid)
                self._streams.pop(stream.rid, None)
                self._fail(stream, InvalidRequest(f"{ENGINE} refused this request: {err}"))

    def _blend_request(self, stream: _Stream) -> Any:
        assert stream.blend_path is not None and stream.request.blend
        digest = stream.blend_path.name
        if digest not in self._blends:
            request = _lora_request(blend_name(stream.request.blend), next(self._lora_ids), stream.blend_path)
            self._blends[digest] = (request, frozenset(n for n, _ in stream.request.blend))
        return self._blends[digest][0]

    def _reap_cancelled(self) -> None:
        for stream in [s for s in self._streams.values() if s.handle.cancelled]:
            self._abort(stream)
            self._cancel(stream)

    def _deliver(self, stream: _Stream, output: Any) -> None:
        request, now = stream.request, time.perf_counter()
        completion = output.outputs[0] if output.outputs else None
        scored = None
        if not stream.started:
            stream.started = True
            self.metrics.prompt_tokens.inc(len(request.prompt_ids), adapter=request.label)
            if request.prompt_logprobs is not None and output.prompt_logprobs is not None:
                scored = convert.prompt_logprobs(request.prompt_ids, output.prompt_logprobs, request.prompt_logprobs)
        if request.params.max_tokens == 0:  # only the prompt was to be scored: its one sampled token is dropped
            if not output.finished:
                self._abort(stream)
            self._finish(stream, StreamEvent(finish_reason="length", prompt_tokens=len(request.prompt_ids),
                                             prompt_logprobs=scored), "length")
            return
        ids = list(completion.token_ids) if completion is not None else []
        if ids:
            if stream.generated == 0:
                self.metrics.ttft.observe(now - stream.submitted)
            else:
                self.metrics.token_latency.observe((now - stream.last_time) / len(ids))
            stream.last_time = now
            stream.generated += len(ids)
        k = request.logprobs
        logprobs = None
        if k is not None and completion is not None and completion.logprobs is not None:
            logprobs = [convert.token_logprob(t, e, k) for t, e in zip(ids, completion.logprobs, strict=True)]
        reason = None
        if output.finished:
            reason = completion.finish_reason if completion is not None else None
            if reason not in ("stop", "length"):
                self._fail(stream, RahfError(f"{ENGINE} ended this generation: {reason}"))
                return
        event = StreamEvent(completion.text if completion is not None else "", ids, reason, None,
                            len(request.prompt_ids), stream.generated, logprobs, scored,
                            getattr(output, "num_cached_tokens", None))  # its prefix cache's hits
        if reason is None:
            stream.sink(event)
        else:
            self._finish(stream, event, reason)

    def _abort(self, stream: _Stream) -> None:
        if self._llm is None or stream.rid not in self._streams:
            return
        try:
            self._llm.abort_request([stream.rid])
        except Exception:  # a dead engine core has nothing left to abort; the stream still ends
            log.exception("aborting request %s failed", stream.rid)

    def _finish(self, stream: _Stream, event: StreamEvent, status: str) -> None:
        """Every stream that ends passes here once: count it, forget it, send its last event."""
        if stream.done:
            return
        stream.done = True
        self._streams.pop(stream.rid, None)
        with self._counting:
            self._inflight -= 1
        self.metrics.requests.inc(adapter=stream.request.label, status=status)
        self.metrics.generated_tokens.inc(stream.generated, adapter=stream.request.label)
        stream.sink(event)

    def _cancel(self, stream: _Stream) -> None:
        self.metrics.cancelled.inc()
        self._finish(stream, StreamEvent(finish_reason="cancelled", prompt_tokens=len(stream.request.prompt_ids),
                                         completion_tokens=stream.generated), "cancelled")

    def _fail(self, stream: _Stream, err: RahfError) -> None:
        self._finish(stream, StreamEvent(finish_reason="error", error=err, prompt_tokens=len(stream.request.prompt_ids),
                                         completion_tokens=stream.generated), "error")

    def _gauges(self) -> None:
        running = min(len(self._streams), self.options.max_num_seqs)
        self.metrics.running.set(running)
        self.metrics.queue_depth.set(self._pending.qsize() + len(self._streams) - running)


def _lora_request(name: str, lora_id: int, path: Path) -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(name, lora_id, str(path))

