"""Engine correctness: batching changes nothing a request sees; reference = the same request alone."""

from __future__ import annotations

import threading

import pytest
import torch

from rahf_serve.engine import Engine
from rahf_serve.errors import AdapterRemoved, InvalidRequest, ModelNotFound, QueueFull, RequestTooLarge
from rahf_serve.request import GenerationRequest, SteeringSpec
from rahf_serve.sampling import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
FEW = SamplingParams(max_tokens=5)
PROMPTS = ["Hello there", "The capital of France is", "Write a haiku about rain, please.", "1 2 3 4 5 6 7",
           "Once upon a time", "Why is the sky blue?", "def add(a, b):", "Tell me a joke about cats and dogs"]


def mixed_requests(engine: Engine, params: SamplingParams = GREEDY) -> list[GenerationRequest]:
    adapters = [None, "kind", "terse", "kind", None, "terse", None, "kind"]
    tok = engine.tokenizer
    reqs = [GenerationRequest(tok(p)["input_ids"], params, a) for p, a in zip(PROMPTS, adapters, strict=True)]
    reqs[4] = GenerationRequest(reqs[4].prompt_ids, params, blend=(("kind", 0.7), ("terse", -0.4)))
    reqs[6] = GenerationRequest(reqs[6].prompt_ids, params, "terse", steering=SteeringSpec("kind", 3.0))
    return reqs


def run_concurrently(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in reqs]

    def worker(i: int) -> None:
        out[i] = engine.generate(reqs[i]).token_ids

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_concurrent_mixed_greedy_equals_alone(runtime):
    engine, _ = runtime
    reqs = mixed_requests(engine)
    alone = [engine.generate(r).token_ids for r in reqs]
    assert all(len(ids) == GREEDY.max_tokens for ids in alone)
    assert len({tuple(ids) for ids in alone}) == len(alone)  # distinct requests, distinct outputs
    assert all(len(set(ids)) > 1 for ids in alone)  # not one token repeated
    assert run_concurrently(engine, reqs) == alone


def test_seeded_sampling_is_reproducible(runtime):
    """Each request owns its generator. (Batched vs alone is only float-close, so a sampled token near a
    top_p or multinomial boundary may differ; greedy batch invariance is tested above.)"""
    engine, _ = runtime
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7)
    reqs = mixed_requests(engine, seeded)[:4]
    first = run_concurrently(engine, reqs)
    assert run_concurrently(engine, reqs) == first
    other = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=8)
    assert engine.generate(GenerationRequest(reqs[0].prompt_ids, other)).token_ids != first[0]


def test_late_arrival_joins_running_batch(runtime):
    """A request submitted while a long one runs finishes first: it did not wait for the batch to end."""
    engine, _ = runtime
    tok = engine.tokenizer
    finished: list[str] = []
    long_started = threading.Event()

    def sink(event):
        long_started.set()
        if event.finish_reason:
            finished.append("long")

    engine.submit(GenerationRequest(tok("long")["input_ids"], SamplingParams(max_tokens=60, temperature=0)), sink)
    assert long_started.wait(30)
    short = GenerationRequest(tok("short")["input_ids"], SamplingParams(max_tokens=3, temperature=0))
    done = engine.generate(short)
    assert done.completion_tokens == 3
    assert "long" not in finished  # the short request did not wait for the running one to end


def test_greedy_matches_transformers_generate(runtime, lively_model_dir):
    """Reference: plain `generate` on a fresh copy of the base gives the engine's base tokens."""
    from tests.serving.conftest import load_lively

    engine, _ = runtime
    ref = load_lively(lively_model_dir)
    ids = engine.tokenizer(PROMPTS[2], return_tensors="pt")
    out = ref.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)
    expected = out[0, ids["input_ids"].shape[1]:].tolist()
    got = engine.generate(GenerationRequest(ids["input_ids"][0].tolist(), GREEDY)).token_ids
    assert got[:len(expected)] == expected


def test_cancel_stops_generation(runtime):
    engine, _ = runtime
    events = []
    finished = threading.Event()

    def sink(event):
        events.append(event)
        if len(events) == 2:
            handle.cancel()
        if event.finish_reason:
            finished.set()

    before = engine.metrics.cancelled.value()
    handle = engine.submit(GenerationRequest(engine.tokenizer("x")["input_ids"],
                                             SamplingParams(max_tokens=64, temperature=0)), sink)
    assert finished.wait(30)
    assert events[-1].finish_reason == "cancelled"
    assert len(events) < 64
    assert engine.metrics.cancelled.value() == before + 1


@pytest.mark.parametrize("request_, error", [
    (GenerationRequest([1, 2], SamplingParams(max_tokens=65)), RequestTooLarge),
    (GenerationRequest([1] * 1000, SamplingParams(max_tokens=60)), RequestTooLarge),
    (GenerationRequest([], SamplingParams(max_tokens=5)), InvalidRequest),
    (GenerationRequest([1], SamplingParams(max_tokens=5, top_p=0)), InvalidRequest),
    (GenerationRequest([1], FEW, "nope"), ModelNotFound),
    (GenerationRequest([1], FEW, blend=(("kind", 1.0), ("nope", 1.0))), ModelNotFound),
    (GenerationRequest([1], FEW, "kind", blend=(("kind", 1.0),)), InvalidRequest),
    (GenerationRequest([1], FEW, steering=SteeringSpec("kind", 1.0, (99,))), InvalidRequest),
    (GenerationRequest([1], FEW, steering=SteeringSpec("kind", float("nan"))), InvalidRequest),
])
def test_invalid_requests_raise_on_submit(runtime, request_, error):
    engine, _ = runtime
    with pytest.raises(error):
        engine.submit(request_, lambda e: None)


def test_queue_full(runtime):
    engine, _ = runtime
    engine.max_queue, saved = 0, engine.max_queue
    try:
        with pytest.raises(QueueFull):
            engine.submit(GenerationRequest([1, 2, 3], FEW), lambda e: None)
    finally:
        engine.max_queue = saved


def test_unload_ends_running_requests_and_blends(lively_model_dir, adapter_dir):
    from rahf_serve.registry import AdapterRegistry
    from tests.serving.conftest import load_lively

    engine = Engine(load_lively(lively_model_dir))
    registry = AdapterRegistry(engine, adapter_dir)
    registry.load_dir()
    with engine:
        events, started = [], threading.Event()

        def sink(event):
            events.append(event)
            started.set()

        blend = (("kind", 0.5), ("terse", 0.5))
        engine.submit(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=64, temperature=0), blend=blend), sink)
        assert started.wait(30)
        assert len(engine._slots.resident) == 3  # kind, terse, the blend
        registry.unload("kind")
        assert len(engine._blends) == 0
        final = engine.generate(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=2), "terse"))
        assert final.completion_tokens == 2
        assert isinstance(events[-1].error, AdapterRemoved)
        assert engine.adapters == ["terse"] and engine._slots.resident == ["terse"]
        plain = GenerationRequest([1, 2, 3], SamplingParams(max_tokens=4, temperature=0))
        before = engine.generate(plain).token_ids
        registry.unload("terse")  # the last one: no slot holds anything, every slot tensor is zero again
        assert engine._slots.resident == [] and engine.generate(plain).token_ids == before
        assert all(not m.slot_A.any() and not m.slot_B.any() for m in engine._slots._wrapped.values())
        registry.load("kind", str(adapter_dir / "kind"))
        assert engine.generate(GenerationRequest([1, 2, 3], FEW, "kind")).finish_reason in ("stop", "length")
        assert engine._slots._pins.total() == 0  # every ended row gave its slot back


def test_rows_name_their_slot_and_release_it(runtime):
    """Each row carries its own slot index; nothing global is switched, and no pin outlives its row."""
    engine, _ = runtime
    seen: list[list[int | None]] = []
    set_rows = engine._slots.set_rows

    def spy(slots, tokens=None):
        seen.append(list(slots))
        set_rows(slots, tokens)

    engine._slots.set_rows = spy
    try:
        reqs = mixed_requests(engine)[:4]  # base, kind, terse, kind
        done = [threading.Event() for _ in reqs]
        engine.submit_many(reqs, [lambda e, d=d: e.finish_reason and d.set() for d in done])  # one admission
        assert all(d.wait(60) for d in done)
    finally:
        del engine._slots.set_rows
    kind, terse = engine._slots.slot_of("kind"), engine._slots.slot_of("terse")
    assert kind != terse
    assert any(sorted(s, key=str) == sorted([None, kind, terse, kind], key=str) for s in seen)
    assert engine._slots._pins.total() == 0 and not engine._slots.active

def test_engine_thread_runs_in_inference_mode(runtime):
    """Inference mode is per thread: ask the engine thread itself, between two of its steps."""
    engine, _ = runtime
    assert engine.call(torch.is_inference_mode_enabled) is True
    assert torch.is_inference_mode_enabled() is False  # the caller's thread is left alone
