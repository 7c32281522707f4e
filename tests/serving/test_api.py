"""The HTTP API through the real `openai` client against a live uvicorn server on the tiny model."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from rahf_serve.api import create_app
from tests.serving.conftest import LiveServer

GREEDY = dict(max_tokens=8, temperature=0)
HELLO = [{"role": "user", "content": "Hello!"}]


def test_models_lists_base_and_adapters_with_parent(client, runtime):
    engine, _ = runtime
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {engine.base.name, "kind", "terse"}
    assert models["kind"].model_extra["parent"] == engine.base.name
    assert models[engine.base.name].model_extra["parent"] is None


def test_chat_non_streaming_base_and_adapter(client, runtime):
    engine, _ = runtime
    base = client.chat.completions.create(model=engine.base.name, messages=HELLO, **GREEDY)
    kind = client.chat.completions.create(model="kind", messages=HELLO, **GREEDY)
    assert base.object == "chat.completion" and base.choices[0].message.role == "assistant"
    assert base.choices[0].finish_reason in ("stop", "length")
    prompt = engine.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    assert base.usage.prompt_tokens == len(engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert base.usage.total_tokens == base.usage.prompt_tokens + base.usage.completion_tokens
    assert 1 <= base.usage.completion_tokens <= 8
    assert base.choices[0].message.content != kind.choices[0].message.content


def test_chat_streaming_equals_non_streaming(client):
    full = client.chat.completions.create(model="terse", messages=HELLO, **GREEDY)
    chunks = list(client.chat.completions.create(model="terse", messages=HELLO, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_completions_stream_and_not(client, runtime):
    engine, _ = runtime
    full = client.completions.create(model=engine.base.name, prompt="Once upon a time", **GREEDY)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=engine.base.name, prompt="Once upon a time", stream=True, **GREEDY))
    assert full.object == "text_completion" and streamed == full.choices[0].text
    assert full.usage.prompt_tokens == len(engine.tokenizer("Once upon a time")["input_ids"])


def test_blend_and_steering_through_extra_body(client, runtime):
    engine, _ = runtime
    base = engine.base.name
    plain = client.completions.create(model=base, prompt="The weather", **GREEDY).choices[0].text
    blend = client.completions.create(model=base, prompt="The weather", **GREEDY,
                                      extra_body={"adapters": [{"name": "kind", "weight": 1.0},
                                                               {"name": "terse", "weight": -0.5}]})
    steered = client.completions.create(model="kind", prompt="The weather", **GREEDY,
                                        extra_body={"steering": {"adapter": "kind", "coeff": 8.0, "layers": [1]}})
    kind = client.completions.create(model="kind", prompt="The weather", **GREEDY).choices[0].text
    zero = client.completions.create(model="kind", prompt="The weather", **GREEDY,
                                     extra_body={"steering": {"adapter": "kind", "coeff": 0.0}})
    assert blend.choices[0].text != plain
    assert steered.choices[0].text != kind
    assert zero.choices[0].text == kind


@pytest.mark.parametrize("kwargs, error, code", [
    (dict(model="no-such-model"), openai.NotFoundError, "model_not_found"),
    (dict(temperature=-1), openai.BadRequestError, "invalid_request"),
    (dict(messages=[]), openai.BadRequestError, "invalid_request"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, "invalid_request"),
    (dict(n=2), openai.BadRequestError, "invalid_request"),
    (dict(seed=2**70), openai.BadRequestError, "invalid_request"),
    (dict(max_tokens=10_000), openai.BadRequestError, "limit_exceeded"),
    (dict(messages=[{"role": "user", "content": "word " * 2000}]), openai.BadRequestError, "limit_exceeded"),
    (dict(model="kind", extra_body={"adapters": [{"name": "terse", "weight": 1}]}), openai.BadRequestError,
     "invalid_request"),
    (dict(extra_body={"adapters": [{"name": "ghost", "weight": 1}]}), openai.NotFoundError, "model_not_found"),
    (dict(extra_body={"steering": {"adapter": "ghost", "coeff": 1}}), openai.NotFoundError, "model_not_found"),
    (dict(extra_body={"steering": {"adapter": "kind", "coeff": 1, "layers": [3]}}), openai.BadRequestError,
     "invalid_request"),
    (dict(extra_body={"steering": {"adapter": "kind", "coeff": "lots"}}), openai.BadRequestError,
     "invalid_request"),
])
def test_errors_are_openai_shaped(client, runtime, kwargs, error, code):
    engine, _ = runtime
    args = {"model": engine.base.name, "messages": HELLO, "max_tokens": 4, **kwargs}
    with pytest.raises(error) as info:
        client.chat.completions.create(**args)
    body = info.value.body
    assert body["code"] == code and body["message"] and "type" in body and "param" in body


def test_invalid_json_and_wrong_types(server):
    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = httpx.post(server.url + "/v1/completions", json={"model": 3, "prompt": ["a", 7]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.get(server.url + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_503(client, runtime):
    engine, _ = runtime
    engine.max_queue, saved = 0, engine.max_queue
    try:
        with pytest.raises(openai.InternalServerError) as info:
            client.chat.completions.create(model=engine.base.name, messages=HELLO, max_tokens=2)
    finally:
        engine.max_queue = saved
    assert info.value.status_code == 503 and info.value.body["code"] == "queue_full"


def wait_for(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_cancels_generation(client, runtime):
    engine, _ = runtime
    before = engine.metrics.cancelled.value()
    stream = client.completions.create(model=engine.base.name, prompt="Count:", max_tokens=64, temperature=0,
                                       stream=True, extra_body={"stop": None})
    next(iter(stream))
    stream.close()
    assert wait_for(lambda: engine.metrics.cancelled.value() == before + 1)


def test_health_and_metrics(server, client, runtime):
    engine, _ = runtime
    client.chat.completions.create(model="kind", messages=HELLO, max_tokens=3, temperature=0)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for needle in ('rahf_requests_total{adapter="kind",status=', "rahf_generated_tokens_total",
                   "rahf_time_to_first_token_seconds_bucket", "rahf_time_per_output_token_seconds_count",
                   "rahf_queue_depth", "rahf_adapters_loaded 2.0", "rahf_cancelled_generations_total"):
        assert needle in text


def test_api_key_guards_every_route_and_mounts(runtime):
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    engine, registry = runtime
    app = create_app(engine, registry, api_key="s3cret")
    app.router.routes.append(__import__("starlette.routing", fromlist=["Mount"]).Mount(
        "/ui", routes=[Route("/", lambda r: PlainTextResponse("ui"))]))
    with LiveServer(app) as live:
        for method, path in [("GET", "/health"), ("GET", "/metrics"), ("GET", "/v1/models"),
                             ("GET", "/v1/adapters"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/kind"),
                             ("GET", "/v1/presets"), ("POST", "/v1/presets"), ("DELETE", "/v1/presets/x"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/ui/"),
                             ("GET", "/openapi.json")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.request(method, live.url + path, headers=headers)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
        # A browser opens the UI once with ?api_key=..., then the cookie carries it.
        with httpx.Client(base_url=live.url) as browser:
            assert browser.get("/ui/", params={"api_key": "s3cret"}).text == "ui"
            assert browser.get("/ui/").text == "ui"
        assert "kind" in engine.adapters  # the unauthorised DELETE did nothing
