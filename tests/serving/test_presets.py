"""Named presets: a blend and/or steering registered under a name that any client can use as `model`."""

from __future__ import annotations

import httpx
import openai
import pytest

from app.server import add_preset_arg
from rahf_serve.api import create_app
from rahf_serve.errors import RahfError
from tests.serving.conftest import LiveServer

SPEC = {"adapters": [{"name": "kind", "weight": 0.7}, {"name": "terse", "weight": -0.4}],
        "steering": {"adapter": "kind", "coeff": 6.0, "layers": [1]}}
GREEDY = dict(max_tokens=8, temperature=0)


def post(url: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(url + "/v1/presets", json=body, timeout=60, **kwargs)


def test_preset_lifecycle_and_use_as_model(server, client, runtime):
    engine, registry = runtime
    r = post(server.url, {"name": "gentle", **SPEC})
    assert r.status_code == 201, r.text
    assert r.json()["adapters"] == SPEC["adapters"] and r.json()["steering"] == SPEC["steering"]
    try:
        listed = {m.id: m.model_extra for m in client.models.list().data}
        assert listed["gentle"]["parent"] == engine.base.name and listed["gentle"]["preset"] == SPEC
        assert [p["name"] for p in httpx.get(server.url + "/v1/presets").json()["data"]] == ["gentle"]

        by_name = client.chat.completions.create(model="gentle", messages=[{"role": "user", "content": "Hi"}], **GREEDY)
        spelled_out = client.chat.completions.create(model=engine.base.name, messages=[{"role": "user", "content": "Hi"}],
                                                     extra_body=SPEC, **GREEDY)
        plain = client.chat.completions.create(model=engine.base.name, messages=[{"role": "user", "content": "Hi"}],
                                               **GREEDY)
        assert by_name.model == "gentle"
        assert by_name.choices[0].message.content == spelled_out.choices[0].message.content
        assert by_name.choices[0].message.content != plain.choices[0].message.content
        echoed = client.completions.create(model="gentle", prompt="The weather", echo=True, max_tokens=0, logprobs=0)
        same = client.completions.create(model=engine.base.name, prompt="The weather", echo=True, max_tokens=0,
                                         logprobs=0, extra_body=SPEC)
        assert echoed.choices[0].logprobs.token_logprobs == same.choices[0].logprobs.token_logprobs

        with pytest.raises(openai.BadRequestError):  # a preset carries its own selection: no second one on top
            client.completions.create(model="gentle", prompt="x", max_tokens=2,
                                      extra_body={"steering": {"adapter": "kind", "coeff": 1.0}})
        r = httpx.delete(server.url + "/v1/adapters/kind", timeout=60)
        assert r.status_code == 409 and "gentle" in r.json()["error"]["message"]
        assert "kind" in engine.adapters
    finally:
        assert httpx.delete(server.url + "/v1/presets/gentle").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gentle", prompt="x", max_tokens=2)
    assert "gentle" not in [m.id for m in client.models.list().data]
    assert httpx.delete(server.url + "/v1/presets/gentle").status_code == 404
    assert registry.presets() == []


@pytest.mark.parametrize("body, status, code", [
    ({"name": "p1", "adapters": [{"name": "ghost", "weight": 1}]}, 404, "model_not_found"),
    ({"name": "p1", "steering": {"adapter": "ghost", "coeff": 1}}, 404, "model_not_found"),
    ({"name": "p1", "adapters": [{"name": "kind", "weight": 1e9}]}, 400, "invalid_request"),
    ({"name": "p1", "adapters": [{"name": "kind", "weight": "heavy"}]}, 400, "invalid_request"),
    ({"name": "p1", "steering": {"adapter": "kind", "coeff": 1, "layers": [3]}}, 400, "invalid_request"),
    ({"name": "p1"}, 400, "invalid_request"),
    ({"name": "p1", "adapters": [{"name": "kind", "weight": 1}], "temperature": 0}, 400, "invalid_request"),
    ({"name": "../p1", "adapters": [{"name": "kind", "weight": 1}]}, 400, "invalid_adapter_name"),
    ({"name": "kind", "adapters": [{"name": "terse", "weight": 1}]}, 409, "adapter_exists"),
])
def test_presets_are_validated_when_registered(server, runtime, body, status, code):
    r = post(server.url, body)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert runtime[1].presets() == []


def test_the_base_name_and_adapter_names_are_taken(server, runtime):
    engine, _ = runtime
    assert post(server.url, {"name": engine.base.name, **SPEC}).status_code == 409
    assert post(server.url, {"name": "twice", **SPEC}).status_code == 201
    try:
        assert post(server.url, {"name": "twice", **SPEC}).status_code == 409
        r = httpx.post(server.url + "/v1/adapters", json={"name": "twice", "source": "kind"}, timeout=60)
        assert r.status_code == 409
    finally:
        httpx.delete(server.url + "/v1/presets/twice")


def test_preset_routes_need_the_api_key(runtime):
    engine, registry = runtime
    with LiveServer(create_app(engine, registry, api_key="s3cret")) as live:
        for method, path in [("GET", "/v1/presets"), ("POST", "/v1/presets"), ("DELETE", "/v1/presets/x")]:
            assert httpx.request(method, live.url + path, json={"name": "x", **SPEC}).status_code == 401
        assert registry.presets() == []
        auth = {"Authorization": "Bearer s3cret"}
        assert post(live.url, {"name": "keyed", **SPEC}, headers=auth).status_code == 201
        assert httpx.delete(live.url + "/v1/presets/keyed", headers=auth).status_code == 200


def test_preset_argument_uses_the_request_schema(runtime):
    _, registry = runtime
    add_preset_arg(registry, 'cli={"adapters": [{"name": "kind", "weight": 0.5}]}')
    try:
        assert registry.preset("cli").blend == (("kind", 0.5),)
    finally:
        registry.remove_preset("cli")
    for bad in ["no-json-here", 'x={"adapters": []}', 'x={"adapter": "kind"}', "x={not json",
                'x={"adapters": [{"name": "ghost", "weight": 1}]}']:
        with pytest.raises(RahfError):
            add_preset_arg(registry, bad)
    assert registry.presets() == []
