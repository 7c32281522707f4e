"""The generation engine: one base model, per-row adapters, continuous batching in a background thread.

The engine thread owns the model. It loops: run queued control operations (adapter load/unload, which
fill and free LoRA slots), give waiting requests free rows, then run one forward over every row in which
rows still prefilling feed their next prompt chunk and the others their last token, sample a token for
each row whose prompt is complete, drop finished and cancelled rows. Keys and values live in one
`SlotCache` allocated at start (`max_batch` rows of `max_model_len` tokens, see `kvcache.py`);
`validate` refuses any request that could outgrow its slot, so a running row never runs out of cache. A
step is one forward over every row's new tokens packed into one sequence without padding: decoding rows
feed one token, rows still prefilling share what is left of `max_num_batched_tokens` in prompt chunks
(the budget counts attention over long contexts too, see `_chunk_sizes`), so a long prompt delays
running streams by one chunk per step, not by its whole prefill. A row whose prompt starts as another's
in the batch or as a finished one still in the cache, under the same adapter and steering, copies those
tokens' keys and values instead of computing them (`prefixes`). Each row names the
`LoraSlots` slot of its adapter or blend (None for the base), set once per step, and carries its own
steering coefficient, sampling parameters and generator. Rows that
ask for log-probabilities get them from their own logits in the same passes (prompt tokens from the
prefill chunks, see `logprobs.py`), so they reflect that row's adapter, blend and steering.

Adapters are held in host memory and copied into at most `max_loras` slots; a row pins its slot while it
runs, and a request whose adapter finds every slot pinned waits in the queue until one is released.

Callers get tokens through a `sink` callback called on the engine thread; it must return quickly
(the HTTP layer hands events to its event loop with `call_soon_threadsafe`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from .blend import BlendCache, BlendKey
from .bundle import Bundle, check_fits
from .engine_api import ControlQueue, call_on_engine_thread, collect, drain, run_control
from .errors import (
    AdapterRemoved,
    EngineStopped,
    LimitExceeded,
    ModelNotFound,
    QueueFull,
    RahfError,
)
from .kvcache import SlotCache, SlotStep, key_cost, pack_inputs
from .logprobs import TokenLogprob, final_hidden, next_token, output_head, prompt_tokens
from .lora_slots import LoraSlots, LoraWeights, SlotsExhausted, blend_lora, read_lora
from .metrics import ServingMetrics
from .models import BaseModel
from .pacing import StepPacer, chunk_keys, tokens_within
from .packed_llama import PackedLlama, packed_forward_for
from .prefixes import PrefixSharing
from .request import (
    BASE_SLOT,
    GenerationRequest,
    Limits,
    RequestHandle,
    Sink,
    SteeringSpec,
    StreamEvent,
    check_request,
)
from .sampling import TextStream, make_generator, sample_rows
from .selection import check_blend, steering_layers
from .steering import Steer, add_steering, row_deltas

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_MAX_MODEL_LEN = 4096
"""Tokens per request (prompt + max_tokens) when not set and the model allows more: the KV cache holds
max_batch x this many tokens from the start (SmolLM2-135M: 16 x 4096 = 2.8 GiB in float32)."""
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cuda": 512, "cpu": 64}
"""Compute of one step, in tokens, by device type. On a 2-core CPU a step of 8 decoding rows costs about
as much as 30 tokens of Linear work, so 64 keeps a running stream's token gaps near 2x their normal
length while a 4,000-token prompt is fed (docs/serving.md); a GPU has compute to spare."""
DEFAULT_MAX_STEP_SLOWDOWN = {"cpu": 1.7}
"""What `rahf-serve` paces steps to, by device type, when --max-step-slowdown is not given. On the 2-core
CPU a 4,000-token prompt joining 8 streams left their worst gap at 1.92x of the same streams' gap with
nothing joining at 1.7 (2.09x at 1.8, ~3.2x unpaced), the long prompt's first token 1.1x later than at 1.8
(docs/serving.md): the bound is below 2 because the streams' gaps carry noise the pacer's steps do not.
Lower is not better on a shared VM: at 1.5 the first token came 1.4x later and the worst gap was no lower
(2.17x and 3.10x in two rounds, 2.31x and 2.17x at 1.7), the host's slow spells deciding it. Not measured
on a GPU, so off there. `Engine` itself defaults to no pacer: chunk sizes then depend on token counts only,
not on timings, which keeps library runs and tests reproducible to the last bit."""

LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""What `--lora-dtype` may store LoRA factors in (besides the model's own dtype, its default)."""
MATMUL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""What `--matmul-dtype` may run the packed forward's C products in (`Engine`'s `matmul_dtype`)."""


@dataclass
class _Row:
    request: GenerationRequest
    handle: RequestHandle
    sink: Sink
    submitted: float
    generator: torch.Generator | None = None
    text: TextStream | None = None
    slot: str = BASE_SLOT
    lora: int | None = None
    """the LoRA slot that `slot` occupies and this row pins while it runs; None for the base"""
    steer: Steer | None = None
    last_token: int = 0
    fed: int = 0
    """prompt tokens already in the row's cache slot"""
    prompt_hidden: list[torch.Tensor] = field(default_factory=list)
    """final hidden states of the prompt chunks fed so far, when the request asked for prompt log-probs"""
    generated: int = 0
    last_time: float = 0.0
    donor: _Row | None = field(default=None, repr=False, compare=False)
    """a row (in the batch or joining before this one) whose prompt starts as this one's does under the same
    adapter and steering: this row copies the first `shared` tokens' keys and values from it"""
    shared: int = 0
    cached: int = 0
    """prompt tokens whose keys and values it took from another row or a kept slot"""
    output: list[int] = field(default_factory=list)
    """the tokens generated so far"""


@dataclass(frozen=True)
class _Loaded:
    """What the engine holds of one loaded adapter."""

    lora: LoraWeights
    """in host memory, copied into a slot when a request needs it"""
    vectors: dict[int, torch.Tensor]
    """steering vectors on the model's device (empty for a plain LoRA)"""


class Engine:
    def __init__(self, base: BaseModel, *, max_batch: int = 16, max_queue: int = 64, max_new_tokens: int = 1024,
                 max_model_len: int | None = None, max_num_batched_tokens: int | None = None,
                 max_loras: int = 8, max_lora_rank: int = 64, lora_dtype: torch.dtype | None = None,
                 max_step_slowdown: float | None = None, prefix_sharing: bool = True,
                 packed_forward: bool = True, matmul_dtype: torch.dtype = torch.float32,
                 metrics: ServingMetrics | None = None) -> None:
        """`max_model_len`: the most tokens a request may span (prompt + max_tokens); None = the model's context, at
        most DEFAULT_MAX_MODEL_LEN. `max_num_batched_tokens`: the compute of one step, in tokens (decoding rows
        count about one each; prefilling rows share the rest in prompt chunks); None = by device,
        DEFAULT_MAX_NUM_BATCHED_TOKENS. `max_loras`: adapters and blends resident in LoRA slots at once;
        `max_lora_rank`: the largest rank a slot takes (a blend's is the sum of its adapters'); `lora_dtype`: what
        their factors are stored in (None: the model's dtype, bfloat16 with bfloat16 products; `LoraSlots`).
        `max_step_slowdown`: a step that feeds prompt chunks next to decoding rows takes at most this many times a
        decode-only step, by measured time (`pacing`); None = the token budget alone. `prefix_sharing`: a joining
        row copies the keys and values of the prompt start it shares with a row in the batch or a finished row
        still in the cache (same adapter and steering) rather than computing them (`prefixes`); a request asking
        for prompt log-probabilities always computes its own. `packed_forward`: run llama-family bases through
        `PackedLlama` (fewer operators a step, same results) rather than transformers' forward; bases it does not
        cover keep transformers' either way (`forward_impl` says which runs). `matmul_dtype`: what the packed
        forward's C products multiply in on CPU, float32 or bfloat16 (half the weights' bytes, each product's inputs
        rounded to bfloat16; AVX512_BF16's dot products where the CPU has them, else AVX2's; `PackedLlama`;
        and the LoRA row kernel's products of bfloat16 factors, `LoraSlots`); RahfError where they cannot run.
        Raises UnsupportedModelError for bases the KV cache cannot serve exactly (e.g. sliding-window attention)."""
        self.base = base
        self.model: Any = base.model
        self.tokenizer = base.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_new_tokens = max_new_tokens
        context = int(getattr(base.model.config, "max_position_embeddings", 2048))
        self.max_model_len = min(context, DEFAULT_MAX_MODEL_LEN) if max_model_len is None else max_model_len
        if not 0 < self.max_model_len <= context:
            raise RahfError(f"max_model_len {self.max_model_len} must be between 1 and the model's context "
                            f"of {context} tokens")
        if max_num_batched_tokens is None:
            max_num_batched_tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS.get(base.device.type, 512)
        if max_num_batched_tokens < 1:
            raise RahfError("max_num_batched_tokens must be at least 1")
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_step_slowdown = max_step_slowdown
        self.prefix_sharing = prefix_sharing
        self.vocab_size = int(base.model.get_input_embeddings().num_embeddings)
        self.metrics = metrics or ServingMetrics()
        self._loaded: dict[str, _Loaded] = {}
        self._blends = BlendCache()
        self.max_lora_rank = max_lora_rank
        if lora_dtype is None and matmul_dtype == torch.bfloat16:
            lora_dtype = torch.bfloat16  # products that round to bfloat16 gain nothing from float32 factors
        self._slots = LoraSlots(self.model, max_loras=max_loras, max_rank=max_lora_rank, loader=self._lora_for,
                                dtype=lora_dtype, matmul_dtype=matmul_dtype)
        self._eos = _eos_ids(base)
        self._pending: queue.SimpleQueue[_Row] = queue.SimpleQueue()
        self._deferred: list[_Row] = []
        """rows taken from the queue whose LoRA found every slot pinned: first in line at the next admission"""
        self._queueing = threading.Lock()
        """held while a group of rows is queued or the queue is drained, so a group is never split by a drain"""
        self._control: ControlQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._rows: list[_Row] = []
        # Built from the base's config, dtype and device, which adapters attached later do not change.
        self._kv = SlotCache.for_model(self.model, max_batch, self.max_model_len)
        self._key_cost = key_cost(self.model.config)
        self._prefixes = PrefixSharing(self._kv, _selection, self.metrics.prompt_tokens_shared)
        if matmul_dtype != torch.float32 and not packed_forward:
            raise RahfError("bfloat16 products are the packed forward's")
        try:
            self._packed: PackedLlama | None = (packed_forward_for(self.model, self.max_model_len, matmul_dtype)
                                                if packed_forward else None)
        except ValueError as e:
            raise RahfError(str(e)) from e
        log.info("KV cache: %d rows x %d tokens, kv_cache_bytes=%d (%.2f GiB)", max_batch, self.max_model_len,
                 self.kv_cache_bytes, self.kv_cache_bytes / 2**30)
        self._deltas: dict[int, torch.Tensor] | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ------------------------------------------------------------ lifecycle

    def start(self) -> Engine:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="rahf-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        for row in self._rows + self._deferred + drain(self._pending):
            self._fail(row, EngineStopped("the server is shutting down"))
        self._rows, self._deferred = [], []
        self._kv.clear()
        self._prefixes.forget()

    @property
    def kv_cache_bytes(self) -> int:
        """Memory the KV cache took at start; it never grows."""
        return self._kv.storage.numel() * self._kv.storage.element_size()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        return list(self._loaded)

    def vectors(self, adapter: str) -> dict[int, torch.Tensor]:
        if adapter not in self._loaded:
            raise ModelNotFound(f"adapter {adapter!r} is not loaded")
        return self._loaded[adapter].vectors

    def attach_adapter(self, name: str, bundle: Bundle) -> None:
        """Load a read and validated bundle as adapter `name`: checked and read here, stored on the engine
        thread, and copied into a LoRA slot now if one is free (else when a request first needs it)."""
        check_fits(bundle, self.model, self.base.fingerprint, self.base.name)
        lora = read_lora(bundle, name)
        if lora.rank > self.max_lora_rank:  # a rank_pattern can exceed the config's r
            raise LimitExceeded(f"adapter {name!r} has LoRA rank {lora.rank}, above --max-lora-rank "
                                f"{self.max_lora_rank}; restart with a larger --max-lora-rank")
        loaded = _Loaded(lora, {layer: v.to(self.base.device, self.base.dtype) for layer, v in bundle.vectors.items()})

        def op() -> None:
            if name in self._loaded:
                raise RahfError(f"adapter {name!r} is already loaded")
            if len(self._slots.resident) < self._slots.max_loras:
                self._slots.load_weights(name, lora)
            self._loaded[name] = loaded
            self.metrics.adapters_loaded.set(len(self._loaded))

        self.call(op)

    def detach_adapter(self, name: str) -> None:
        """Unload adapter `name`; running requests that use it end with an `adapter_removed` error."""

        def op() -> None:
            if name not in self._loaded:
                raise ModelNotFound(f"adapter {name!r} is not loaded")
            gone = {name, *self._blends.invalidate(name)}
            doomed = [i for i, r in enumerate(self._rows) if _depends_on(_selection(r), gone, name)]
            for i in doomed:
                self._fail(self._rows[i], AdapterRemoved(f"adapter {name!r} was unloaded during generation"))
            self._drop(doomed)
            self._prefixes.forget(lambda selection: _depends_on(selection, gone, name))
            for slot_name in gone & set(self._slots.resident):
                self._slots.unload(slot_name)
            del self._loaded[name]
            self.metrics.adapters_loaded.set(len(self._loaded))

        self.call(op)

    def reset_prefix_cache(self) -> None:
        """Forget the finished rows' keys and values kept in free cache slots (benchmarks and tests that
        want every prompt computed; rows in the batch still share with each other)."""
        self.call(self._prefixes.forget)

    def _lora_for(self, name: str) -> LoraWeights:
        """The weights of an adapter or blend that `LoraSlots.ensure` finds not resident."""
        if name in self._loaded:
            return self._loaded[name].lora
        key = self._blends.key_of(name)
        if key is None:
            raise ModelNotFound(f"LoRA {name!r} is neither a loaded adapter nor a known blend")
        return blend_lora([(self._loaded[n].lora, w) for n, w in key])

    def call(self, fn: Callable[[], T], timeout: float | None = 300.0) -> T:
        """Run `fn` on the engine thread between two steps (directly, if the engine is not running)."""
        def inside() -> T:
            with torch.inference_mode():  # the engine thread runs in it already; a direct call may not
                return fn()

        return call_on_engine_thread(inside, self._thread, self._control, self._wake, timeout)

    # ------------------------------------------------------------ requests

    def submit(self, request: GenerationRequest, sink: Sink) -> RequestHandle:
        """Queue a request; `sink` receives its events on the engine thread. Raises on invalid requests."""
        return self.submit_many([request], [sink])[0]

    def submit_many(self, requests: Sequence[GenerationRequest], sinks: Sequence[Sink]) -> list[RequestHandle]:
        """Queue requests that arrived together (one prompt list): all or none, admitted in one prefill
        as far as the batch has room."""
        if self._thread is None:
            raise EngineStopped("the engine is not running: start it (engine.start() or `with engine:`)")
        for request in requests:
            self.validate(request)
        now = time.perf_counter()
        rows = [_Row(r, RequestHandle(), sink, now) for r, sink in zip(requests, sinks, strict=True)]
        with self._queueing:
            if self._pending.qsize() + len(rows) > self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting; retry later")
            for row in rows:
                self._pending.put(row)
        self.metrics.queue_depth.set(self._pending.qsize())
        self._wake.set()
        return [row.handle for row in rows]

    def generate(self, request: GenerationRequest, timeout: float = 600.0) -> StreamEvent:
        """Blocking convenience: the whole generation as one event (text, token ids, log-probs, usage)."""
        return collect(self, request, timeout)

    @property
    def limits(self) -> Limits:
        return Limits(self.vocab_size, self.max_new_tokens, self.max_model_len)

    def validate(self, request: GenerationRequest) -> None:
        """Raise unless the request can run here: its own fields (`check_request`) and what it names."""
        check_request(request, self.limits)
        self.validate_selection(request.adapter, request.blend, request.steering)

    def validate_selection(self, adapter: str | None, blend: BlendKey | None, steering: SteeringSpec | None) -> None:
        """Raise unless every adapter named is loaded, weights are finite and the steering layers exist."""
        loaded = dict(self._loaded)  # a copy: an unload on the engine thread must not pull names from under us
        check_blend(adapter, blend, {n: a.lora for n, a in loaded.items()}, self.max_lora_rank)
        if steering is not None:
            steering_layers(steering, {n: list(a.vectors) for n, a in loaded.items()})

    def _steer_for(self, spec: SteeringSpec) -> Steer:
        vectors = self.vectors(spec.adapter)
        layers = steering_layers(spec, {spec.adapter: list(vectors)})
        return Steer({layer: vectors[layer] for layer in layers}, spec.coeff)

    # ------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    run_control(self._control)
                    self._admit()
                    if self._rows:
                        self._step()
                    elif self._pending.empty() and self._control.empty() and not self._deferred:
                        self._wake.wait(timeout=1.0)
                        self._wake.clear()
                except Exception as err:  # keep serving: fail the rows in flight, not the process
                    log.exception("engine step failed")
                    for row in self._rows:
                        self._fail(row, RahfError(f"generation failed: {err}"))
                    self._rows, self._deltas = [], None
                    self._kv.clear()
                    self._prefixes.forget()

    def _admit(self) -> None:
        joining: list[_Row] = []
        room = self.max_batch - len(self._rows)
        with self._queueing:
            waiting, self._deferred = self._deferred, []
            waiting += [self._pending.get() for _ in range(min(room - len(waiting), self._pending.qsize()))]
        for row in waiting:
            if row.handle.cancelled:
                self._cancel(row)
                continue
            try:
                self._prepare(row)
            except SlotsExhausted:  # running rows pin every slot; one will be released when they end
                self._deferred.append(row)
                continue
            except RahfError as err:  # e.g. its adapter was unloaded while it waited
                self._fail(row, err)
                continue
            except Exception as err:  # one bad request must not take the running batch down
                log.exception("preparing request %d failed", row.handle.id)
                self._fail(row, RahfError(f"could not start this generation: {err}"))
                continue
            joining.append(row)
        self.metrics.queue_depth.set(self._pending.qsize() + len(self._deferred))
        if not joining:
            return
        joining = self._prefixes.join(self._rows, joining, self.prefix_sharing)  # the next steps prefill them
        self._rows += joining
        self._deltas = None
        self.metrics.running.set(len(self._rows))

    def _prepare(self, row: _Row) -> None:
        """Ready a row to join; its LoRA slot is taken last, so nothing can fail after the pin."""
        req = row.request
        self.validate(req)
        row.generator = make_generator(req.params.seed, self.base.device)
        row.text = TextStream(self.tokenizer, req.params.stop)
        row.steer = self._steer_for(req.steering) if req.steering is not None else None
        if req.blend:
            row.slot = self._blends.name(req.blend)
        elif req.adapter is not None:
            row.slot = req.adapter
        if row.slot != BASE_SLOT:
            row.lora = self._slots.ensure(row.slot, pin=True)
            self._blends.keep(self._slots.resident)

    def _prompt_logprobs(self, rows: Sequence[_Row]) -> list[list[TokenLogprob] | None]:
        """Per row that asked: its prompt tokens scored from the hidden states of its own prefill chunks."""
        head = output_head(self.model)
        out: list[list[TokenLogprob] | None] = []
        for row in rows:
            ids, k = row.request.prompt_ids, row.request.prompt_logprobs
            out.append(None if k is None else prompt_tokens(torch.cat(row.prompt_hidden), head, ids, k))
            row.prompt_hidden = []
        return out

    def _step(self) -> None:
        """One forward over every row: decode rows feed their last token, prefilling rows their next prompt
        chunk (what is left of the token budget, shared equally), packed without padding."""
        cancelled = [i for i, r in enumerate(self._rows) if r.handle.cancelled]
        for i in cancelled:
            self._cancel(self._rows[i])
        self._drop(cancelled)
        if not self._rows:
            return
        self._keep_prefilling_last()
        waiting = self._prefixes.take(self._rows)
        if self._deltas is None:  # rebuilt only when the batch's rows change
            self._deltas = row_deltas([r.steer for r in self._rows], self._hidden, self.base.device, self.base.dtype)
        prefill = [i for i, r in enumerate(self._rows) if _prefilling(r)]
        decoding = [i for i, r in enumerate(self._rows) if not _prefilling(r)]
        decode = self._decode_units(decoding)
        sizes = self._chunk_sizes([i for i in prefill if i not in waiting], decode) | dict.fromkeys(waiting, 0)
        # A prefilling row may sit a step out (sizes 0, see StepPacer); it comes after every decoding row.
        chunks = [list(r.request.prompt_ids[r.fed:r.fed + sizes[i]]) if i in sizes else [r.last_token]
                  for i, r in enumerate(self._rows)]
        prompt_work = self._prompt_work(prefill, chunks) if self._pacer is not None else (0, 0)
        started_at = time.perf_counter()
        scored = any(self._rows[i].request.prompt_logprobs is not None for i in prefill)
        try:
            logits, step, hidden = self._forward(chunks, scored)
            if self._pacer is not None:
                self._pacer.observe(decode, *prompt_work, time.perf_counter() - started_at)
        except Exception as err:
            if not prefill:
                raise
            # A failed step leaves no trace in the cache: fail the rows it was prefilling (a prompt the
            # model cannot take) and let the running rows repeat it.
            log.exception("prefill failed")
            for i in prefill:
                self._fail(self._rows[i], RahfError(f"could not start this generation: {err}"))
            self._drop(prefill)
            return
        offsets = step.offsets()
        feeding = {i: k for k, i in enumerate(i for i, c in enumerate(chunks) if c)}  # logits: one per feeding row
        started = []
        for i in prefill:
            row, n = self._rows[i], len(chunks[i])
            if n == 0:
                continue
            if row.request.prompt_logprobs is not None:
                # a copy: the step's states are freed
                assert hidden is not None
                row.prompt_hidden.append(hidden[offsets[i]:offsets[i] + n].clone())
            row.fed += n
            self.metrics.prompt_tokens.inc(n, adapter=row.request.label)
            if not _prefilling(row):
                started.append(i)
        decoded = logits[[feeding[i] for i in decoding]]
        finished = {decoding[j] for j in self._emit([self._rows[i] for i in decoding], decoded)}
        if started:
            rows = [self._rows[i] for i in started]
            try:
                finished |= {started[j] for j in self._emit(rows, logits[[feeding[i] for i in started]],
                                                             self._prompt_logprobs(rows))}
            except Exception as err:  # e.g. a first token that cannot be sampled: fail that request only
                log.exception("prefill failed")
                for row in rows:
                    self._fail(row, RahfError(f"could not start this generation: {err}"))
                finished |= set(started)
        self._drop(sorted(finished))

    def _chunk_sizes(self, prefill: list[int], decode: float) -> dict[int, int]:
        """Prompt tokens each prefilling row feeds this step. The budget counts compute in tokens of
        Linear work, a query at context L costing 1 + L x key_cost: decoding rows take theirs first, the
        prefilling rows share the rest equally, and a row deep into a long prompt gets a smaller chunk,
        since each of its queries attends to more keys. `decode`: the decoding rows' units (`_decode_units`)."""
        if not prefill:
            return {}
        lengths = self._kv.lengths
        share = max(1.0, (self.max_num_batched_tokens - decode) / len(prefill))
        sizes = {i: tokens_within(share, lengths[i], self._key_cost) for i in prefill}
        caps = None if self._pacer is None else self._pacer.caps(decode, [lengths[i] for i in prefill])
        return sizes if caps is None else {i: min(sizes[i], cap) for i, cap in zip(prefill, caps, strict=True)}

    @property
    def pacer(self) -> StepPacer | None:
        """The step pacer (None without `max_step_slowdown`), for benchmarks that tune or read it."""
        return self._pacer

    @property
    def max_step_slowdown(self) -> float | None:
        return None if self._pacer is None else self._pacer.slowdown

    @max_step_slowdown.setter
    def max_step_slowdown(self, value: float | None) -> None:
        """Set between steps (a fresh pacer learns the step times again)."""
        self._pacer = None if value is None else StepPacer(value, key_cost(self.model.config))

    def _decode_units(self, decoding: list[int]) -> float:
        lengths = self._kv.lengths
        return sum(1 + lengths[i] * self._key_cost for i in decoding)

    def _prompt_work(self, prefill: list[int], chunks: list[list[int]]) -> tuple[int, int]:
        """(prompt tokens, keys their queries attend to) of a step's chunks (read before the step runs)."""
        lengths = self._kv.lengths
        return (sum(len(chunks[i]) for i in prefill),
                sum(chunk_keys(lengths[i], len(chunks[i])) for i in prefill))

    @property
    def forward_impl(self) -> str:
        """Which forward the engine runs: "packed-llama" (`PackedLlama`) or "transformers"."""
        return "transformers" if self._packed is None else "packed-llama"

    def _forward(self, chunks: list[list[int]], keep_hidden: bool
                 ) -> tuple[torch.Tensor, SlotStep, torch.Tensor | None]:
        """Each row's next-token logits [rows, vocab] from one forward over the rows' packed tokens, and the
        decoder's final hidden states [total, hidden] when `keep_hidden` (prompt log-probs read them)."""
        step = self._kv.begin_step([len(c) for c in chunks])
        ids = pack_inputs(chunks, self.base.device)
        assert self._deltas is not None
        # Steering is per row; the packed sequence needs it per token.
        deltas = {layer: d.index_select(0, step.rows)[None] for layer, d in self._deltas.items()}
        self._slots.set_rows([r.lora for r in self._rows], [len(c) for c in chunks])
        try:
            if self._packed is not None:
                logits, hidden = self._packed(ids, step, self._kv, deltas, keep_hidden, self._slots.active)
            else:
                # logits_to_keep only narrows the LM head; prompt log-probs read the decoder's full output.
                with self._kv.attending(self.model), _maybe_steer(self.model, deltas), \
                        final_hidden(self.model) if keep_hidden else nullcontext([]) as captured:
                    out = self.model(input_ids=ids, attention_mask=step.attention_mask,
                                     position_ids=step.position_ids, cache=self._kv, use_cache=True,
                                     logits_to_keep=step.logits_to_keep)
                logits, hidden = step.last_logits(out.logits), captured[0] if keep_hidden else None
        finally:
            # Between steps the model is the plain base again, whatever else calls it.
            self._slots.clear_rows()
        self._kv.end_step()
        return logits, step, None if hidden is None else hidden[0]

    def _keep_prefilling_last(self) -> None:
        """Move rows still prefilling after every decoding row (a row's cache slot moves with it), so that
        the decode rows form one run: one attention call and one gathered LoRA matmul for all of them."""
        while True:
            prefill = [i for i, r in enumerate(self._rows) if _prefilling(r)]
            decode = [i for i, r in enumerate(self._rows) if not _prefilling(r)]
            if not prefill or not decode or min(prefill) > max(decode):
                return
            i, j = min(prefill), max(decode)
            self._kv.swap(i, j)
            self._rows[i], self._rows[j] = self._rows[j], self._rows[i]
            self._deltas = None

    def _emit(self, rows: Sequence[_Row], logits: torch.Tensor,
              prompt_logprobs: Sequence[list[TokenLogprob] | None] | None = None) -> set[int]:
        """Sample a token for each row, send it on; returns the indices of rows that finished.

        `prompt_logprobs` (after a prefill) go out with each row's first event.
        """
        if not rows:
            return set()
        tokens = sample_rows(logits, [r.request.params for r in rows], [r.generator for r in rows])  # type: ignore[misc]
        now = time.perf_counter()
        finished = set()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            assert row.text is not None
            scored = prompt_logprobs[i] if prompt_logprobs is not None else None
            if row.request.params.max_tokens == 0:  # only the prompt was to be scored
                row.sink(StreamEvent(finish_reason="length", prompt_tokens=len(row.request.prompt_ids),
                                     prompt_logprobs=scored, cached_tokens=row.cached))
                finished.add(i)
                self._end(row, "length")
                continue
            if row.generated == 0:
                self.metrics.ttft.observe(now - row.submitted)
            else:
                self.metrics.token_latency.observe(now - row.last_time)
            row.last_time = now
            row.last_token = token
            row.output.append(token)
            row.generated += 1
            reason = None
            if token in self._eos:
                text, reason = row.text.flush(), "stop"
            else:
                text, stopped = row.text.push(token)
                if stopped:
                    reason = "stop"
                elif row.generated >= row.request.params.max_tokens:
                    text, reason = text + row.text.flush(), "length"
            k = row.request.logprobs
            row.sink(StreamEvent(text, [token], reason, None, len(row.request.prompt_ids), row.generated,
                                 [next_token(logits[i], token, k)] if k is not None else None, scored,
                                 row.cached))
            if reason is not None:
                finished.add(i)
                self._end(row, reason)
        return finished

    def _drop(self, indices: Sequence[int]) -> None:
        if not indices:
            return
        leaving = {i: self._rows[i] for i in indices}
        order = self._kv.remove(indices)
        self._prefixes.left(leaving)
        self._rows = [self._rows[j] for j in order]
        self._deltas = None
        self.metrics.running.set(len(self._rows))

    def _end(self, row: _Row, status: str) -> None:
        """Every row that ends (finished, cancelled, failed) passes here: count it, release its slot."""
        if row.lora is not None:
            self._slots.unpin(row.slot)
            row.lora = None
        self.metrics.requests.inc(adapter=row.request.label, status=status)
        self.metrics.generated_tokens.inc(row.generated, adapter=row.request.label)

    def _cancel(self, row: _Row) -> None:
        self.metrics.cancelled.inc()
        self._end(row, "cancelled")
        row.sink(StreamEvent(finish_reason="cancelled", prompt_tokens=len(row.request.prompt_ids),
                             completion_tokens=row.generated, cached_tokens=row.cached))

    def _fail(self, row: _Row, err: RahfError) -> None:
        self._end(row, "error")
        row.sink(StreamEvent(finish_reason="error", error=err, prompt_tokens=len(row.request.prompt_ids),
                             completion_tokens=row.generated, cached_tokens=row.cached))

    @property
    def _hidden(self) -> int:
        return int(self.base.model.config.hidden_size)

    @property
    def _pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def _selection(row: _Row) -> tuple[str, SteeringSpec | None, BlendKey | None]:
    """What a row's keys and values depend on besides its tokens: its LoRA slot's name (an adapter, a blend
    or the base), its steering, and a blend's adapters (a blend's slot name says nothing of them once the
    blend is no longer resident)."""
    return row.slot, row.request.steering, row.request.blend or None


def _depends_on(selection: Any, slots: set[str], adapter: str) -> bool:
    """Whether a `_selection` uses one of the LoRA `slots` or is computed with `adapter`'s weights or vectors."""
    slot, steering, blend = selection
    return (slot in slots or (steering is not None and steering.adapter == adapter)
            or any(name == adapter for name, _ in blend or ()))


def _prefilling(row: _Row) -> bool:
    return row.fed < len(row.request.prompt_ids)


def _maybe_steer(model: Any, deltas: dict[int, torch.Tensor]) -> Any:
    return add_steering(model, deltas) if deltas else nullcontext()


def _eos_ids(base: BaseModel) -> set[int]:
    ids = {base.tokenizer.eos_token_id}
    gen = getattr(base.model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return {int(i) for i in ids if i is not None}

