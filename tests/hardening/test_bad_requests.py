"""Hostile request bodies on a live server: each a 4xx with an OpenAI-shaped error, never a 500 or a hang.

tests/serving/test_api.py covers `{not json`, wrong field types and max_tokens above the limit
for completions; this adds the sizes and encodings an attacker would try.
"""

from __future__ import annotations

import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
JSON = {"content-type": "application/json"}


def send(server, path: str, body: bytes) -> httpx.Response:
    # A bounded timeout: a hang fails the test instead of blocking CI.
    return httpx.post(server.url + path, content=body, headers=JSON, timeout=60)


def assert_4xx(r: httpx.Response, *allowed: int) -> dict:
    assert r.status_code in allowed, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert error["message"] and error["type"] in ("invalid_request_error", "not_found_error")
    return error


def chat(model: str, **fields) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def test_huge_body_is_refused(server, runtime):
    engine, _ = runtime
    body = json.dumps({"model": engine.base.name, "messages": [{"role": "user", "content": "a" * (20 << 20)}]})
    assert_4xx(send(server, CHAT, body.encode()), 413)


def test_huge_chunked_body_without_a_length_is_refused(server):
    def chunks():  # no Content-Length: the limit must count what actually arrives
        for _ in range(40):
            yield b"a" * (1 << 20)

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers=JSON, timeout=60)
    assert_4xx(r, 413)


def test_with_api_key_a_huge_body_is_401_without_the_key_and_413_with_it(runtime):
    # With --api-key, a client without the key gets 401 without the server reading its body.
    engine, registry = runtime
    from rahf_serve.api import create_app
    from tests.serving.conftest import LiveServer

    with LiveServer(create_app(engine, registry, api_key="k")) as live:
        r = httpx.post(live.url + CHAT, content=b"a" * (20 << 20), headers=JSON, timeout=60)
        assert r.status_code == 401
        r = httpx.post(live.url + CHAT, content=b"a" * (20 << 20), headers={**JSON, "Authorization": "Bearer k"},
                       timeout=60)
        assert_4xx(r, 413)


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [10**6, 2**63, 10**40])
def test_huge_max_tokens_is_400(server, runtime, field, value):
    engine, _ = runtime
    assert_4xx(send(server, CHAT, chat(engine.base.name, **{field: value})), 400)


def test_prompt_longer_than_the_context_is_400(server, runtime):
    engine, _ = runtime
    body = json.dumps({"model": engine.base.name, "prompt": "hello " * 5000, "max_tokens": 2}).encode()
    assert assert_4xx(send(server, "/v1/completions", body), 400)["code"] == "limit_exceeded"


def test_deeply_nested_json_is_400(server, runtime):
    engine, _ = runtime
    nested = "[" * 100_000 + "]" * 100_000
    body = f'{{"model": "{engine.base.name}", "messages": {nested}}}'.encode()
    assert_4xx(send(server, CHAT, body), 400)


def test_too_many_messages_is_400(server, runtime):
    engine, _ = runtime
    messages = [{"role": "user", "content": "hi"}] * 5000
    body = json.dumps({"model": engine.base.name, "messages": messages}).encode()
    assert assert_4xx(send(server, CHAT, body), 400)["param"] == "messages"


def test_many_short_messages_within_the_count_limit_but_over_the_context_is_400(server, runtime):
    engine, _ = runtime
    messages = [{"role": "user", "content": "hello there"}] * 1000
    body = json.dumps({"model": engine.base.name, "messages": messages, "max_tokens": 2}).encode()
    assert assert_4xx(send(server, CHAT, body), 400)["code"] == "limit_exceeded"


@pytest.mark.parametrize("raw", [b'{"model": "\xff\xfe", "prompt": "x"}', b"\xc3\x28", b"\x00\x00\x00{}"])
def test_invalid_utf8_is_400(server, raw):
    assert_4xx(send(server, "/v1/completions", raw), 400)


@pytest.mark.parametrize("fields", [
    {"messages": "hi"},
    {"messages": [{"role": "root", "content": "hi"}]},
    {"messages": [{"role": "user", "content": {"nested": [1, 2]}}]},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1.5},
    {"messages": [{"role": "user", "content": "hi"}], "stream": {"yes": True}},
    {"messages": [{"role": "user", "content": "hi"}], "adapters": []},
    {"messages": [{"role": "user", "content": "hi"}], "adapters": [{"name": "kind", "weight": "NaN"}]},
    {"messages": [{"role": "user", "content": "hi"}], "steering": {"adapter": "kind", "coeff": 1e308 * 10}},
    {"messages": [{"role": "user", "content": "hi"}], "steering": {"adapter": "kind", "coeff": 1, "layers": [10**9]}},
    {"messages": [{"role": "user", "content": "hi"}], "seed": 2**64},
    {"messages": [{"role": "user", "content": "hi"}], "stop": [["x"]]},
])
def test_wrong_types_and_values_are_400(server, runtime, fields):
    engine, _ = runtime
    body = json.dumps({"model": engine.base.name, **fields}).encode()
    assert_4xx(send(server, CHAT, body), 400)


@pytest.mark.parametrize("body", [b"", b"null", b"[]", b'"text"', b"1e999999"])
def test_bodies_that_are_not_objects_are_400(server, body):
    assert_4xx(send(server, CHAT, body), 400)


def test_adapter_load_body_wrong_types_are_400(server):
    for body in ({"name": ["x"], "source": "kind"}, {"name": "x"}, {"name": "x", "source": 5}):
        assert_4xx(httpx.post(server.url + "/v1/adapters", json=body, timeout=60), 400)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("temperature, top_p", [(1e-100, 0.7), (5e-324, 1.0), (1e-7, 0.7), (1.0, 5e-324),
                                                (10.0, 1e-300)])
def test_tiny_temperatures_and_top_p_sample_like_greedy(server, temperature, top_p, stream):
    # Found by the fuzzer: temperature 3e-115 made logits / t NaN and the request hung; a top_p
    # that is 0 in float32 dropped every token (500).
    greedy = send(server, CHAT, chat("kind", max_tokens=6, temperature=0)).json()["choices"][0]["message"]["content"]
    r = send(server, CHAT, chat("kind", max_tokens=6, temperature=temperature, top_p=top_p, stream=stream))
    assert r.status_code == 200, r.text[:300]
    if stream:
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text
    else:
        assert r.json()["choices"][0]["message"]["content"] == greedy


def test_server_still_serves_after_all_that(server, runtime):
    engine, _ = runtime
    r = send(server, CHAT, chat(engine.base.name, max_tokens=2))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
