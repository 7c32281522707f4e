"""The OpenAI fields that evaluation harnesses and generic clients send, through the real `openai` client:
token-id prompts, prompt lists, echo, logprobs and top_logprobs, list-of-parts content, and refusals."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from tests.helpers import merged_bundles, token_logprobs
from tests.serving.conftest import load_lively

PROMPT = "Once upon a time there was"
HELLO = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def plain(lively_model_dir):
    return load_lively(lively_model_dir).model.eval()


@torch.no_grad()
def greedy_logprobs(model, ids: list[int], steps: int) -> list[float]:
    """Reference: greedy decoding by hand, one full forward pass per token."""
    seq, out = list(ids), []
    for _ in range(steps):
        logp = torch.log_softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].double(), dim=-1)
        seq.append(int(logp.argmax()))
        out.append(float(logp[seq[-1]]))
    return out


def ids_of(engine, text: str) -> list[int]:
    return engine.tokenizer(text)["input_ids"]


def test_token_id_prompt_equals_the_string_prompt(client, runtime):
    engine, _ = runtime
    base = engine.base.name
    text = client.completions.create(model=base, prompt=PROMPT, max_tokens=6, temperature=0)
    ids = client.completions.create(model=base, prompt=ids_of(engine, PROMPT), max_tokens=6, temperature=0)
    assert ids.choices[0].text == text.choices[0].text
    assert ids.usage.prompt_tokens == len(ids_of(engine, PROMPT))


def test_a_list_of_token_id_lists_is_one_batch(client, runtime, monkeypatch):
    engine, _ = runtime
    prompts = [ids_of(engine, p) for p in ("Hello there", "A much longer second prompt than the first", "x")]
    alone = [client.completions.create(model="kind", prompt=p, max_tokens=5, temperature=0).choices[0].text
             for p in prompts]
    steps: list[list[int]] = []
    forward = engine._forward

    def recording(chunks, *args, **kwargs):
        steps.append([len(c) for c in chunks])
        return forward(chunks, *args, **kwargs)

    monkeypatch.setattr(engine, "_forward", recording)
    together = client.completions.create(model="kind", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in together.choices] == [0, 1, 2]
    assert [c.text for c in together.choices] == alone  # sharing the batch changes nothing
    assert steps[0] == [len(p) for p in prompts]  # the three prompts are prefilled in one step
    assert together.usage.prompt_tokens == sum(len(p) for p in prompts)
    strings = client.completions.create(model="kind", prompt=["Hello there", "x"], max_tokens=5, temperature=0)
    assert [c.text for c in strings.choices] == [alone[0], alone[2]]
    chunks = list(client.completions.create(model="kind", prompt=prompts, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert streamed == alone and chunks[-1].usage.prompt_tokens == together.usage.prompt_tokens


def test_echo_with_max_tokens_zero_scores_the_prompt(client, runtime, plain):
    engine, _ = runtime
    ids = ids_of(engine, PROMPT)
    r = client.completions.create(model=engine.base.name, prompt=ids, echo=True, max_tokens=0, logprobs=2)
    choice = r.choices[0]
    assert choice.text == engine.tokenizer.decode(ids) and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [engine.tokenizer.decode([i]) for i in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(token_logprobs(plain, ids), abs=1e-4)
    for token, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
        assert 2 <= len(top) <= 3 and top[token] == value and max(top.values()) >= value
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(ids))]
    text_only = client.completions.create(model=engine.base.name, prompt=PROMPT, echo=True, max_tokens=0)
    assert text_only.choices[0].text == PROMPT and text_only.choices[0].logprobs is None


def test_echoed_logprobs_are_the_rows_own_adapter(client, runtime, plain, adapter_dir):
    engine, _ = runtime
    ids = ids_of(engine, PROMPT)

    def echoed(model: str) -> list[float]:
        r = client.completions.create(model=model, prompt=ids, echo=True, max_tokens=0, logprobs=0)
        return r.choices[0].logprobs.token_logprobs[1:]

    kind, base = echoed("kind"), echoed(engine.base.name)
    reference = token_logprobs(merged_bundles(plain, {"kind": adapter_dir / "kind"}, {"kind": 1.0}), ids)
    assert kind == pytest.approx(reference, abs=1e-4)
    assert max(abs(a - b) for a, b in zip(kind, base, strict=True)) > 1e-2


def test_completion_logprobs_top_k_and_echo_with_generation(client, runtime, plain):
    engine, _ = runtime
    ids = ids_of(engine, PROMPT)
    r = client.completions.create(model=engine.base.name, prompt=ids, max_tokens=4, temperature=0, logprobs=3)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == r.usage.completion_tokens == 4
    assert lp.text_offset[0] == len(PROMPT)  # offsets count from the prompt's start, as OpenAI's do
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value == max(top.values())  # greedy: the chosen token is the most likely one
        assert 3 <= len(top) <= 4
    assert lp.token_logprobs == pytest.approx(greedy_logprobs(plain, ids, 4), abs=1e-4)
    echoed = client.completions.create(model=engine.base.name, prompt=ids, max_tokens=4, temperature=0, logprobs=3,
                                       echo=True).choices[0]
    assert echoed.text == engine.tokenizer.decode(ids) + choice.text
    assert echoed.logprobs.token_logprobs[len(ids):] == lp.token_logprobs
    streamed = list(client.completions.create(model=engine.base.name, prompt=ids, max_tokens=4, temperature=0,
                                              logprobs=3, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == echoed.text
    assert [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs] == \
        echoed.logprobs.token_logprobs


def test_chat_logprobs_and_top_logprobs(client, runtime):
    engine, _ = runtime
    r = client.chat.completions.create(model="terse", messages=HELLO, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == entry.top_logprobs[0].logprob  # greedy
    special = set(engine.tokenizer.all_special_tokens)
    text = b"".join(bytes(e.bytes) for e in content if e.token not in special).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content
    plain = client.chat.completions.create(model="terse", messages=HELLO, max_tokens=6, temperature=0)
    assert plain.choices[0].logprobs is None
    chunks = list(client.chat.completions.create(model="terse", messages=HELLO, max_tokens=6, temperature=0,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [e.logprob for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # The repeated prompt now comes from the first request's kept keys, its last token fed alone: the same
    # values up to float rounding, not to the last bit.
    assert streamed == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_usage_counts_the_prompt_tokens_taken_from_an_earlier_request(client):
    """The same chat twice: the second takes all but its prompt's last token from the first, which OpenAI's
    usage reports as cached tokens, streamed or not; the answer is the same."""
    messages = [{"role": "user", "content": "A question asked twice, word for word, of the same adapter."}]
    first = client.chat.completions.create(model="terse", messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model="terse", messages=messages, max_tokens=3, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    chunks = list(client.chat.completions.create(model="terse", messages=messages, max_tokens=3, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    other = client.chat.completions.create(model="kind", messages=messages, max_tokens=3, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens < other.usage.prompt_tokens - 1  # another adapter


def test_content_as_a_list_of_text_parts(client, runtime):
    engine, _ = runtime
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    as_parts = client.chat.completions.create(model=engine.base.name, messages=[{"role": "user", "content": parts}],
                                              max_tokens=6, temperature=0)
    as_text = client.chat.completions.create(model=engine.base.name,
                                             messages=[{"role": "user", "content": "Hello\nthere"}],
                                             max_tokens=6, temperature=0)
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens


@pytest.mark.parametrize("part", [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                  {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}])
def test_non_text_parts_are_refused_by_name(client, runtime, part):
    engine, _ = runtime
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=engine.base.name, max_tokens=2,
                                       messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}])
    assert part["type"] in info.value.body["message"] and info.value.body["param"] == "messages.0.content"


CHAT = {"messages": HELLO, "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}


@pytest.mark.parametrize("path, fields, named", [
    ("chat", {"top_k": 5}, "top_k"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": -1}, "presence_penalty"),
    ("chat", {"logit_bias": {"17": 5}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("chat", {"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name"),
    ("chat", {"messages": [{"role": "tool", "content": "hi"}]}, "messages.0.role"),
    ("chat", {"max_tokens": 0}, "max_tokens"),
    ("completions", {"best_of": 2}, "best_of"),
    ("completions", {"suffix": "the end"}, "suffix"),
    ("completions", {"logprobs": 21}, "logprobs"),
    ("completions", {"prompt": [0, 10**9]}, "token ids"),
    ("completions", {"prompt": []}, "prompt"),
    ("completions", {"n": 2}, "n"),
])
def test_unsupported_fields_and_values_are_400_naming_them(server, runtime, path, fields, named):
    engine, _ = runtime
    body = {"model": engine.base.name, **(CHAT if path == "chat" else COMPLETION), **fields}
    r = httpx.post(f"{server.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert named in error["message"] or named == error["param"], error


@pytest.mark.parametrize("fields", [{"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "user": "u1",
                                     "response_format": {"type": "text"}},
                                    {"messages": [{"role": "developer", "content": "Be brief."}, *HELLO]}])
def test_the_specs_off_values_are_accepted(server, runtime, fields):
    engine, _ = runtime
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": engine.base.name, **CHAT, **fields}, timeout=60)
    assert r.status_code == 200, r.text
