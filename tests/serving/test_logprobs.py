"""Log-probabilities in the engine: each row of one mixed batch scored under its own adapter, blend or
steering, against plain PEFT models and hand-written hooks run one sequence at a time."""

from __future__ import annotations

import queue

import pytest
import torch

from rahf_serve.blend import blend_key
from rahf_serve.bundle import read_bundle
from rahf_serve.logprobs import next_token, prompt_tokens
from rahf_serve.request import GenerationRequest, SteeringSpec, StreamEvent
from rahf_serve.sampling import SamplingParams
from tests.helpers import merged_bundles, steered_by_hand, token_logprobs
from tests.serving.conftest import load_lively

BLEND = {"kind": 0.7, "terse": -0.4}


def collect(engine, requests: list[GenerationRequest]) -> list[StreamEvent]:
    """Submit together (one prefill) and return each request's first event."""
    boxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in requests]
    engine.submit_many(requests, [box.put for box in boxes])
    return [box.get(timeout=120) for box in boxes]


def test_each_row_of_a_mixed_batch_is_scored_under_its_own_selection(runtime, lively_model_dir, adapter_dir):
    engine, _ = runtime
    tok = engine.tokenizer
    # Different lengths, so all but the longest row are padded in the shared prefill.
    prompts = [tok(t)["input_ids"] for t in ("The weather today", "A much longer prompt about the weather in spring",
                                              "Hi there", "Tell me about steering vectors and blends")]
    params = SamplingParams(max_tokens=1, temperature=0)
    requests = [GenerationRequest(prompts[0], params, logprobs=3, prompt_logprobs=3),
                GenerationRequest(prompts[1], params, "kind", logprobs=3, prompt_logprobs=3),
                GenerationRequest(prompts[2], params, blend=blend_key(list(BLEND.items())), logprobs=3,
                                  prompt_logprobs=3),
                GenerationRequest(prompts[3], params, "kind", steering=SteeringSpec("kind", 6.0, (1,)), logprobs=3,
                                  prompt_logprobs=3)]
    events = collect(engine, requests)

    plain = load_lively(lively_model_dir).model.eval()
    bundles = {"kind": adapter_dir / "kind", "terse": adapter_dir / "terse"}
    kind = merged_bundles(plain, bundles, {"kind": 1.0})
    steer = {1: read_bundle(adapter_dir / "kind").vectors[1]}
    references = [(plain, None), (kind, None), (merged_bundles(plain, bundles, BLEND), None), (kind, steer)]
    for prompt, event, (model, vectors) in zip(prompts, events, references, strict=True):
        assert event.error is None
        with steered_by_hand(model, vectors or {}, 6.0):
            want = token_logprobs(model, prompt + event.token_ids)
        got = [e.logprob for e in event.prompt_logprobs] + [e.logprob for e in event.logprobs]
        assert got[0] is None and [e.token for e in event.prompt_logprobs] == prompt
        torch.testing.assert_close(torch.tensor(got[1:], dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                                   atol=1e-4, rtol=0)
        top = event.prompt_logprobs[-1].top
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
    # The rows really differ: the same prompt under another selection gets other numbers.
    assert abs(sum(token_logprobs(plain, prompts[1])) - sum(token_logprobs(kind, prompts[1]))) > 1e-2


def test_max_tokens_zero_scores_without_generating(runtime):
    engine, _ = runtime
    ids = engine.tokenizer("Only score me")["input_ids"]
    event = engine.generate(GenerationRequest(ids, SamplingParams(max_tokens=0), prompt_logprobs=0))
    assert event.finish_reason == "length" and event.token_ids == [] and event.completion_tokens == 0
    assert len(event.prompt_logprobs) == len(ids) and all(e.top == () for e in event.prompt_logprobs)


def test_prompt_scoring_in_chunks_equals_one_pass(monkeypatch):
    import rahf_serve.logprobs as lp

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, ids = torch.randn(23, 8), torch.randint(0, 50, (23,)).tolist()
    whole = prompt_tokens(hidden, head, ids, 4)
    monkeypatch.setattr(lp, "CHUNK", 5)
    chunked = prompt_tokens(hidden, head, ids, 4)
    assert [(e.token, [t for t, _ in e.top]) for e in chunked] == [(e.token, [t for t, _ in e.top]) for e in whole]
    assert [e.logprob for e in chunked[1:]] == pytest.approx([e.logprob for e in whole[1:]], abs=1e-6)
    logits = head(hidden[-1])
    assert next_token(logits, 7, 2).logprob == float(torch.log_softmax(logits.double(), -1)[7])
