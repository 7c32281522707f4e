"""The engine on its slot KV cache: rows that join mid-stream, leave from the middle of the batch, or
bring long prompts see exactly what they would alone; the cache is allocated once and bounds requests."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from rahf_serve.blend import blend_name
from rahf_serve.engine import Engine
from rahf_serve.errors import RahfError, RequestTooLarge
from rahf_serve.kvcache import UnsupportedModelError, kv_cache_bytes
from rahf_serve.models import load_base
from rahf_serve.pacing import chunk_keys
from rahf_serve.registry import AdapterRegistry
from rahf_serve.request import GenerationRequest, SteeringSpec
from rahf_serve.sampling import SamplingParams
from tests.conftest import TINY
from tests.helpers import random_lora_bundle
from tests.serving.conftest import burst, load_lively


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40_000, (length,), generator=g).tolist()


def alone(engine: Engine, reqs: list[GenerationRequest]) -> list[list[int]]:
    return [engine.generate(r).token_ids for r in reqs]


def staggered(engine: Engine, reqs: list[GenerationRequest],
              joins: list[tuple[int, int] | None]) -> list[list[int]]:
    """Serve `reqs` with rows joining mid-stream: reqs[i] is submitted at once when joins[i] is None,
    else when request joins[i][0] has produced joins[i][1] tokens (requests triggered by the same
    token join in one prefill, in list order). Returns each request's tokens."""
    tokens: list[list[int]] = [[] for _ in reqs]
    done = [threading.Event() for _ in reqs]
    errors: list[object] = []

    def sink_for(i: int):
        def sink(event) -> None:
            tokens[i] += event.token_ids
            if event.token_ids:
                for j, join in enumerate(joins):
                    if join == (i, len(tokens[i])):
                        engine.submit(reqs[j], sink_for(j))  # on the engine thread: joins the next step
            if event.finish_reason:
                if event.error is not None:
                    errors.append(event.error)
                done[i].set()
        return sink

    for i, join in enumerate(joins):
        if join is None:
            engine.submit(reqs[i], sink_for(i))
    for event in done:
        assert event.wait(120), "a request never finished (its trigger did not fire?)"
    assert not errors
    return tokens


@pytest.fixture
def steps(runtime, monkeypatch) -> list[tuple[list[int], list[int]]]:
    """Every step the engine begins: (tokens each row feeds, each row's cached tokens before the step)."""
    engine, _ = runtime
    began: list[tuple[list[int], list[int]]] = []
    real = engine._kv.begin_step

    def begin_step(n_new):
        began.append((list(n_new), engine._kv.lengths))
        return real(n_new)

    monkeypatch.setattr(engine._kv, "begin_step", begin_step)
    return began


@pytest.fixture
def moves(runtime) -> Iterator[list[int]]:
    """Counts rows the cache moved into a freed slot (a row left from the middle of the batch)."""
    engine, _ = runtime
    kv, counted = engine._kv, []
    real = kv.remove

    def remove(rows):
        order = real(rows)
        counted.append(sum(1 for i, j in enumerate(order) if i != j))
        return order

    kv.remove = remove
    yield counted
    del kv.remove


def test_staggered_joins_and_leaves_equal_alone(runtime, moves):
    engine, _ = runtime
    specs = [  # (prompt length, max_tokens, adapter, joins when)
        (3, 30, None, None),
        (21, 4, "kind", (0, 2)),  # leaves early from slot 1, under a running row
        (9, 24, "terse", (0, 2)),
        (8, 3, None, (1, 2)),
        (1, 1, "kind", (2, 5)),  # done at its prefill, from the middle of the joining rows
        (15, 12, None, (2, 5)),
        (40, 6, "terse", (2, 5)),
    ]
    reqs = [GenerationRequest(prompt(n, seed), greedy(m), a) for seed, (n, m, a, _) in enumerate(specs)]
    reqs[2] = GenerationRequest(reqs[2].prompt_ids, reqs[2].params, "terse", steering=SteeringSpec("kind", 3.0))
    expected = alone(engine, reqs)
    assert [len(t) for t in expected] == [m for _, m, _, _ in specs]  # nobody stopped early: leaves are as planned
    moves.clear()
    assert staggered(engine, reqs, [j for *_, j in specs]) == expected
    assert sum(moves) >= 2  # rows really left from the middle and the last row moved into their slot


def test_long_prompt_joining_running_streams_changes_nothing(runtime):
    engine, _ = runtime
    reqs = [GenerationRequest(prompt(6, 10), greedy(40)), GenerationRequest(prompt(11, 11), greedy(30), "kind"),
            GenerationRequest(prompt(900, 12), greedy(20), "terse", prompt_logprobs=0)]
    expected = alone(engine, reqs)
    assert staggered(engine, reqs, [None, None, (0, 5)]) == expected


def test_a_step_computes_exactly_its_rows_tokens(runtime, monkeypatch, steps):
    """Prompts joining running streams (two at once, one of them landing between running rows when a
    stream leaves) share forwards with the decoding rows, packed: every forward computes exactly the
    tokens its rows feed, within the budget, none padded. Outputs stay those of each request alone."""
    engine, _ = runtime
    reqs = [GenerationRequest(prompt(6, 20), greedy(30)), GenerationRequest(prompt(7, 21), greedy(4), "kind"),
            GenerationRequest(prompt(5, 22), greedy(30), "terse", steering=SteeringSpec("kind", 2.0)),
            GenerationRequest(prompt(300, 23), greedy(5), "kind"), GenerationRequest(prompt(170, 24), greedy(5))]
    expected = alone(engine, reqs)
    monkeypatch.setattr(engine, "max_num_batched_tokens", 64)
    steps.clear()
    computed: list[int] = []
    hook = engine.model.get_input_embeddings().register_forward_hook(
        lambda module, args, out: computed.append(out.shape[:-1].numel()))
    try:
        assert staggered(engine, reqs, [None, None, None, (1, 3), (1, 3)]) == expected
    finally:
        hook.remove()
    fed = [n for n, _ in steps]
    assert computed == [sum(n) for n in fed]
    assert max(computed) <= 64
    assert any(max(n) > 1 and n.count(1) >= 2 for n in fed)  # decode rows and a prompt chunk in one forward


def test_chunks_shrink_as_a_long_prompts_context_grows(runtime, monkeypatch, steps):
    """The budget counts attention: each chunk of a long prompt attends to all the keys before it, so
    its chunks get smaller as it is fed, and every step's estimated compute stays within the budget."""
    engine, _ = runtime
    monkeypatch.setattr(engine, "max_num_batched_tokens", 64)
    steps.clear()
    stream, long = GenerationRequest(prompt(5, 30), greedy(40)), GenerationRequest(prompt(900, 31), greedy(2))
    assert staggered(engine, [stream, long], [None, (0, 2)]) == alone(engine, [stream, long])
    chunks = [n[-1] for n, _ in steps if len(n) == 2 and n[-1] > 1]
    assert chunks[0] > 2 * chunks[-2]  # the last chunk is the prompt's remainder
    assert all(a >= b for a, b in zip(chunks, chunks[1:-1], strict=False))
    cost = engine._key_cost
    for n_new, lengths in steps:
        assert sum(n * (1 + (have + n) * cost) for n, have in zip(n_new, lengths, strict=True)) <= 64 + 1


def test_long_prompt_logprobs_equal_alone(runtime):
    """Echo of a long prompt prefilled next to a short one (right padding) equals its echo alone."""
    engine, _ = runtime
    long = GenerationRequest(prompt(700, 13), greedy(2), "kind", prompt_logprobs=1)
    short = GenerationRequest(prompt(4, 14), greedy(2), prompt_logprobs=1)
    single = [engine.generate(r).prompt_logprobs for r in (long, short)]
    boxes: list[list] = [[], []]
    finished = [threading.Event(), threading.Event()]

    def sink_for(i: int):
        def sink(event) -> None:
            boxes[i].append(event)
            if event.finish_reason:
                finished[i].set()
        return sink

    engine.submit_many([short, long], [sink_for(0), sink_for(1)])
    assert all(f.wait(60) for f in finished)
    together = [boxes[1][0].prompt_logprobs, boxes[0][0].prompt_logprobs]
    for got, want in zip(together, single, strict=True):
        assert [e.token for e in got] == [e.token for e in want]
        torch.testing.assert_close(torch.tensor([e.logprob for e in got[1:]]),
                                   torch.tensor([e.logprob for e in want[1:]]), atol=1e-4, rtol=0)


def fed_tokens(reqs: list[GenerationRequest], tokens: list[list[int]], shared: int) -> int:
    """Tokens the forwards compute for these requests: each prompt but what was shared, then each generated
    token but the last."""
    return sum(len(r.prompt_ids) for r in reqs) - shared + sum(len(t) - 1 for t in tokens)


@pytest.fixture
def computed_alone(runtime, monkeypatch):
    """Each request run alone with prefix sharing off (every prompt computed in full); the kept slots are
    forgotten after, so what a test shares is what it sets up."""
    engine, _ = runtime

    def run(reqs: list[GenerationRequest]) -> list[list[int]]:
        monkeypatch.setattr(engine, "prefix_sharing", False)
        try:
            return alone(engine, reqs)
        finally:
            monkeypatch.setattr(engine, "prefix_sharing", True)
            engine.reset_prefix_cache()

    return run


def shared_by(engine: Engine, run) -> tuple[object, int]:
    """`run()`'s result and the prompt tokens shared while it ran."""
    before = engine.metrics.prompt_tokens_shared.total()
    out = run()
    return out, int(engine.metrics.prompt_tokens_shared.total() - before)


def test_rows_with_the_same_prompt_start_and_selection_compute_it_once(runtime, monkeypatch, steps, computed_alone):
    """Of requests joining together, one computes each prompt start per adapter and steering; the others
    sharing it wait, copy its keys and values and compute the rest. Each equals its run alone. A row that
    scores its prompt, or runs under another adapter or steering, computes all of it; with sharing off
    every row does."""
    engine, _ = runtime
    common = prompt(40, 70)
    steered = SteeringSpec("kind", 2.0)
    reqs = [GenerationRequest(common, greedy(8)),
            GenerationRequest(common, greedy(8)),  # all but its last token from row 0
            GenerationRequest(common + prompt(5, 71), greedy(8)),  # the 40 in common from row 0
            GenerationRequest(common, greedy(8), "kind"),
            GenerationRequest(common, greedy(8), "kind", steering=steered),
            GenerationRequest(common, greedy(8), "kind", steering=steered),  # 39 from row 4
            GenerationRequest(common, greedy(8), prompt_logprobs=0)]
    expected = computed_alone(reqs)
    assert len({tuple(t) for t in expected[3:5]}) == 2  # the steering changes what "kind" says
    for sharing, copied in ((True, 39 + 40 + 39), (False, 0)):
        monkeypatch.setattr(engine, "prefix_sharing", sharing)
        engine.reset_prefix_cache()
        steps.clear()
        got, shared = shared_by(engine, lambda: staggered(engine, reqs, [None] * len(reqs)))
        assert (got, shared) == (expected, copied)
        assert sum(sum(n) for n, _ in steps) == fed_tokens(reqs, expected, copied)
    monkeypatch.setattr(engine, "prefix_sharing", True)
    engine.reset_prefix_cache()
    steps.clear()
    staggered(engine, reqs, [None] * len(reqs))
    first = steps[0][0]
    assert first[1] == first[2] == first[5] == 0 and min(first[0], first[3], first[4], first[6]) > 0


def test_a_row_copies_its_prompt_start_from_a_running_stream(runtime, steps, computed_alone):
    """A prompt joining a stream that began with the same prompt feeds only its last token."""
    engine, _ = runtime
    reqs = [GenerationRequest(prompt(30, 72), greedy(20), "terse"), GenerationRequest(prompt(30, 72), greedy(6), "terse")]
    expected = computed_alone(reqs)
    steps.clear()
    assert shared_by(engine, lambda: staggered(engine, reqs, [None, (0, 3)])) == (expected, 29)
    assert [n for n, _ in steps if len(n) == 2][0] == [1, 1]


def test_a_row_whose_donor_leaves_computes_its_prompt_itself(runtime, monkeypatch, computed_alone):
    """Cancelling the row computing a shared long prompt while another waits for it: the waiting row
    computes the prompt itself and answers as alone."""
    engine, _ = runtime
    long = prompt(600, 73)
    donor, follower = GenerationRequest(long, greedy(4)), GenerationRequest(long, greedy(4))
    expected = computed_alone([follower])[0]
    began: list[list[int]] = []
    real = engine._kv.begin_step

    def begin_step(n_new):
        began.append(list(n_new))
        if len(began) == 2:
            next(r for r in engine._rows if r.request is donor).handle.cancel()
        return real(n_new)

    monkeypatch.setattr(engine._kv, "begin_step", begin_step)
    assert shared_by(engine, lambda: staggered(engine, [donor, follower], [None, None])) == ([[], expected], 0)
    assert began[0][1] == began[1][1] == 0 and began[2] == [began[2][0]]  # waited, then fed alone


def test_a_chat_s_next_turn_takes_its_history_from_the_finished_turn(runtime, steps, computed_alone):
    """A finished request's keys stay in its free slot: the next request under the same selection whose
    prompt repeats the first one's prompt and answer computes only what is new; under another adapter, or
    once that slot is taken, it computes everything. Each equals its run alone."""
    engine, _ = runtime
    first = GenerationRequest(prompt(20, 74), greedy(10), "kind")
    (answer,) = computed_alone([first])
    follow_up = list(first.prompt_ids) + answer + prompt(6, 75)
    again = GenerationRequest(follow_up, greedy(5), "kind")
    other = GenerationRequest(follow_up, greedy(5), "terse")
    expected = computed_alone([first, again, other])
    history = 20 + 10 - 1  # the last answer token was sampled, never fed
    assert shared_by(engine, lambda: alone(engine, [first, again])) == (expected[:2], history)
    engine.reset_prefix_cache()
    assert shared_by(engine, lambda: alone(engine, [first, other])) == ([expected[0], expected[2]], 0)
    unrelated = GenerationRequest(prompt(4, 76), greedy(1), "kind")
    assert shared_by(engine, lambda: alone(engine, [first, unrelated, again])) == (
        [expected[0], alone(engine, [unrelated])[0], expected[1]], 0)  # the unrelated request took slot 0


def test_two_chats_that_end_apart_both_find_their_history(runtime, computed_alone):
    """Two chats in one batch, the first ending first (the second moves into its slot, and they trade: the
    first's keys go to the second's old slot): both next turns take their history, each seated in the slot
    that holds it, though they join in the other order."""
    engine, _ = runtime
    a, b = GenerationRequest(prompt(20, 80), greedy(4), "kind"), GenerationRequest(prompt(20, 81), greedy(12))
    answers = computed_alone([a, b])
    next_a = GenerationRequest(list(a.prompt_ids) + answers[0] + prompt(3, 82), greedy(3), "kind")
    next_b = GenerationRequest(list(b.prompt_ids) + answers[1] + prompt(3, 83), greedy(3))
    expected = computed_alone([next_a, next_b])
    assert burst(engine, [a, b])[0] == answers
    assert shared_by(engine, lambda: burst(engine, [next_a, next_b])[0]) == (expected, (20 + 4 - 1) + (20 + 12 - 1))


def test_an_adapter_loaded_again_under_its_name_shares_nothing_from_before(runtime, tmp_path, computed_alone,
                                                                            lively_model_dir):
    """Unloading an adapter forgets what finished rows computed under it: new weights under the old name
    compute every prompt."""
    engine, registry = runtime
    req = GenerationRequest(prompt(25, 77), greedy(6), "terse")
    source = registry.get("terse").source
    random_lora_bundle(load_lively(lively_model_dir), tmp_path / "new", seed=9, r=2, targets=("q_proj", "v_proj", "o_proj"))
    registry.load("new", str(tmp_path / "new"))
    try:
        (expected,) = computed_alone([GenerationRequest(req.prompt_ids, req.params, "new")])
    finally:
        registry.unload("new")
    (before,) = alone(engine, [req])  # kept in slot 0 under "terse"
    assert before != expected
    try:
        registry.unload("terse")
        registry.load("terse", str(tmp_path / "new"))
        assert shared_by(engine, lambda: alone(engine, [req])) == ([expected], 0)
    finally:
        registry.unload("terse")
        registry.load("terse", source)


def test_a_blend_forgotten_before_its_adapter_is_loaded_again_shares_nothing_from_before(
        runtime, tmp_path, computed_alone, lively_model_dir):
    """A blend's name is forgotten once it leaves the LoRA slots (evicted here by hand); what finished rows kept
    under it must still go when one of its adapters is unloaded, or the same blend of the new weights
    would take the old keys."""
    engine, registry = runtime
    blend = (("kind", 0.3), ("terse", 1.5))
    req = GenerationRequest(prompt(25, 78), greedy(6), blend=blend)
    source = registry.get("terse").source
    random_lora_bundle(load_lively(lively_model_dir), tmp_path / "new", seed=9, r=2, targets=("q_proj", "v_proj", "o_proj"))
    (before,) = alone(engine, [req])  # kept in slot 0 under the blend

    def evict() -> None:  # as when other adapters need the blend's LoRA slot
        engine._slots.unload(blend_name(blend))
        engine._blends.keep(engine._slots.resident)

    engine.call(evict)
    try:
        registry.unload("terse")
        registry.load("terse", str(tmp_path / "new"))
        got = shared_by(engine, lambda: alone(engine, [req]))
        (expected,) = computed_alone([req])
        assert expected != before and got == ([expected], 0)
    finally:
        registry.unload("terse")
        registry.load("terse", source)


def test_cache_storage_is_allocated_once(runtime):
    engine, _ = runtime
    storage = engine._kv.storage
    ptr = storage.data_ptr()
    assert engine.kv_cache_bytes == kv_cache_bytes(engine.model.config, engine.max_batch, engine.max_model_len,
                                                   torch.float32)
    reqs = [GenerationRequest(prompt(n, 20 + n), greedy(m), a)
            for n, m, a in [(5, 12, None), (300, 3, "kind"), (2, 9, "terse"), (40, 1, None), (17, 20, "kind")]]
    staggered(engine, reqs, [None, (0, 1), (0, 1), (2, 3), (2, 3)])
    assert engine._kv.storage is storage and storage.data_ptr() == ptr
    assert engine.call(lambda: engine._kv.rows) == 0  # between steps: every finished row was freed


def test_requests_longer_than_the_cache_are_refused_up_front(lively_model_dir):
    engine = Engine(load_lively(lively_model_dir), max_batch=2, max_model_len=64)
    with engine:
        with pytest.raises(RequestTooLarge, match="60 tokens.*max_tokens \\(5\\).*64 tokens"):
            engine.submit(GenerationRequest(prompt(60, 1), greedy(5)), lambda e: None)
        with pytest.raises(RequestTooLarge):
            engine.submit(GenerationRequest(prompt(65, 1), greedy(0), prompt_logprobs=0), lambda e: None)
        # Exactly at the limit: runs to the end without outgrowing its slot.
        done = engine.generate(GenerationRequest(prompt(60, 1), SamplingParams(max_tokens=4, temperature=0)))
        assert done.error is None and done.finish_reason in ("length", "stop")
    with pytest.raises(RahfError, match="max_model_len 2000.*context of 1024"):
        Engine(load_lively(lively_model_dir), max_model_len=2000)


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory, tokenizer) -> Path:
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           sliding_window=32, **TINY)
    path = tmp_path_factory.mktemp("sliding-mistral")
    MistralForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def test_sliding_window_base_is_refused_at_start(mistral_dir):
    base = load_base(str(mistral_dir), device="cpu", dtype="float32")
    with pytest.raises(UnsupportedModelError, match="'mistral'.*sliding-window attention \\(window 32\\)"):
        Engine(base)
    # The window is the reason: rows no longer than it are served.
    with Engine(base, max_model_len=32) as engine:
        assert engine.generate(GenerationRequest(prompt(8, 2), greedy(3))).completion_tokens == 3


MANY = [0, 9, 17, 31, 42, 50, 63]


@pytest.fixture(scope="module")
def many_bundles(tmp_path_factory, lively_model_dir) -> Path:
    base = load_lively(lively_model_dir)
    root = tmp_path_factory.mktemp("many")
    for i in range(64):
        random_lora_bundle(base, root / f"a{i:02d}", seed=100 + i, with_vectors=False)
    return root


def test_64_adapters_loaded_equal_one_loaded(lively_model_dir, many_bundles):
    reqs = [GenerationRequest(prompt(4 + 3 * k, 30 + k), greedy(10), f"a{i:02d}") for k, i in enumerate(MANY)]
    reqs.append(GenerationRequest(prompt(7, 40), greedy(10)))

    one = Engine(load_lively(lively_model_dir))
    registry = AdapterRegistry(one, many_bundles)
    expected = []
    with one:
        for r in reqs:
            if r.adapter is not None:
                registry.load(r.adapter, str(many_bundles / r.adapter))
            expected.append(one.generate(r).token_ids)
            if r.adapter is not None:
                registry.unload(r.adapter)
    assert len({tuple(t) for t in expected}) == len(expected)  # each adapter really changes the output

    many = Engine(load_lively(lively_model_dir))
    AdapterRegistry(many, many_bundles).load_dir()
    with many:
        assert len(many.adapters) == 64
        assert staggered(many, reqs, [None, None, (0, 1), (0, 1), (1, 2), (1, 2), (3, 4), (3, 4)]) == expected


def test_long_prompt_is_prefilled_in_chunks_while_streams_go_on(runtime, monkeypatch):
    """Each step feeds the long prompt one chunk and the running stream one token; the echo gathered
    over the chunks equals one prefill of the whole prompt."""
    engine, _ = runtime
    stream = GenerationRequest(prompt(5, 50), greedy(60))
    long = GenerationRequest(prompt(600, 51), greedy(3), "kind", prompt_logprobs=2)
    monkeypatch.setattr(engine, "max_num_batched_tokens", 4096)
    whole = engine.generate(long)
    expected = alone(engine, [stream])[0]
    monkeypatch.setattr(engine, "max_num_batched_tokens", 64)  # 1 decoding row: 63-token chunks, 10 steps
    streamed_before_long = []
    events: list = []
    done = [threading.Event(), threading.Event()]

    def on_stream(event) -> None:
        events.append(("stream", event))
        if sum(1 for who, _ in events if who == "stream") == 3:
            engine.submit(long, on_long)
        if event.finish_reason:
            done[0].set()

    def on_long(event) -> None:
        if not streamed_before_long:
            streamed_before_long.append(sum(1 for who, _ in events if who == "stream"))
        events.append(("long", event))
        if event.finish_reason:
            done[1].set()

    engine.submit(stream, on_stream)
    assert all(d.wait(120) for d in done)
    assert [t for who, e in events if who == "stream" for t in e.token_ids] == expected
    assert [t for who, e in events if who == "long" for t in e.token_ids] == whole.token_ids
    assert streamed_before_long[0] >= 3 + 9  # the stream kept going while the prompt was fed
    chunked = next(e for who, e in events if who == "long").prompt_logprobs
    assert [(e.token, [t for t, _ in e.top]) for e in chunked] == [(e.token, [t for t, _ in e.top])
                                                                   for e in whole.prompt_logprobs]
    torch.testing.assert_close(torch.tensor([e.logprob for e in chunked[1:]]),
                               torch.tensor([e.logprob for e in whole.prompt_logprobs[1:]]), atol=1e-4, rtol=0)


def test_a_paced_engine_holds_prompts_back_until_it_has_timed_a_decode_step(runtime, monkeypatch, steps):
    """With --max-step-slowdown and no decode-only step timed, a prompt joining running rows sits every
    step out (its rows feed nothing) and starts once the stream has ended; both see what they see alone."""
    engine, _ = runtime
    stream, joining = GenerationRequest(prompt(5, 60), greedy(12)), GenerationRequest(prompt(200, 61), greedy(3))
    expected = alone(engine, [stream, joining])
    monkeypatch.setattr(engine, "max_step_slowdown", 2.0)
    monkeypatch.setattr(engine._pacer, "observe", lambda *args: None)  # never learns: stays at "hold back"
    steps.clear()
    assert staggered(engine, [stream, joining], [None, (0, 2)]) == expected
    two_rows = [n for n, _ in steps if len(n) == 2]
    assert two_rows and all(n == [1, 0] for n in two_rows)  # the prompt never ran beside the stream


def test_a_paced_engine_caps_prompt_work_at_its_allowance(runtime, monkeypatch, steps):
    """Once the pacer has step times, every step that decodes feeds at most its allowance of prompt work
    (at least one token), far below the token budget; outputs are those of each request alone."""
    engine, _ = runtime
    stream, long = GenerationRequest(prompt(5, 62), greedy(40)), GenerationRequest(prompt(300, 63), greedy(2), "kind")
    expected = alone(engine, [stream, long])
    monkeypatch.setattr(engine, "max_num_batched_tokens", 256)
    monkeypatch.setattr(engine, "max_step_slowdown", 2.0)
    pacer = engine._pacer
    cost = engine._key_cost
    pacer.decode_seconds = 0.010  # allowance: 10 ms a step, a token 1 ms, a key `cost` ms
    pacer.prior_miss = 1.0  # no step is observed, so no miss: aim at the bound
    monkeypatch.setattr(pacer, "costs", lambda: (0.001, 0.001 * cost))
    monkeypatch.setattr(pacer, "observe", lambda *args: None)
    steps.clear()
    assert staggered(engine, [stream, long], [None, (0, 2)]) == expected
    beside = [(n[1], lengths[1]) for n, lengths in steps if len(n) == 2 and n[0] == 1 and n[1] > 1]
    assert beside, "the long prompt was never fed beside the stream"
    assert all(n + chunk_keys(have, n) * cost <= 10 + 1 for n, have in beside)
    assert sum(n for n, _ in beside) >= 200  # most of the prompt went in beside the stream, <= 10 tokens a step


def test_a_paced_prompt_sits_a_step_out_to_retime_the_streams(runtime, monkeypatch, steps):
    """Every `refresh_every` chunked steps the prompt feeds nothing for one step, so the pacer times the
    running streams alone again; outputs are those of each request alone."""
    engine, _ = runtime
    stream, long = GenerationRequest(prompt(5, 64), greedy(40)), GenerationRequest(prompt(300, 65), greedy(2))
    expected = alone(engine, [stream, long])
    monkeypatch.setattr(engine, "max_step_slowdown", 2.0)
    pacer = engine._pacer
    pacer.refresh_every = 4
    pacer.decode_seconds = 0.010
    monkeypatch.setattr(pacer, "costs", lambda: (0.0005, 0.0005 * engine._key_cost))  # ~10-20 tokens a step
    steps.clear()
    assert staggered(engine, [stream, long], [None, (0, 2)]) == expected
    # beside the stream, while the prompt is fed: "c" a chunk, "-" the prompt sat out
    fed = "".join("c" if n[1] else "-" for n, lengths in steps
                  if len(n) == 2 and n[0] == 1 and lengths[1] + n[1] < len(long.prompt_ids))
    assert fed.count("c") >= 8 and "ccccc" not in fed and "-cccc-" in fed, fed
