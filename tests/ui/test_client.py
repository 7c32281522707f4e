"""The UI's API client against the real rahf-serve API: catalog, streams, blends, steering, errors."""

from __future__ import annotations

import asyncio

import pytest

from app.client import ApiError, ArenaClient


def collect(arena, body: dict) -> str:
    async def run() -> str:
        client = ArenaClient(arena.url)
        try:
            return "".join([delta async for delta in client.stream_chat(body)])
        finally:
            await client.aclose()

    return asyncio.run(run())


def chat(model: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
            "temperature": 0, **extra}


def test_catalog_lists_the_base_and_the_adapters(arena):
    async def run():
        client = ArenaClient(arena.url)
        try:
            return await client.catalog()
        finally:
            await client.aclose()

    catalog = asyncio.run(run())
    assert catalog.base == arena.registry.engine.base.name
    assert catalog.adapters == ("kind", "terse") and catalog.presets == ()
    arena.registry.add_preset("gentle", (("kind", 0.5),), None, {"adapters": [{"name": "kind", "weight": 0.5}]})
    try:
        catalog = asyncio.run(run())
        assert catalog.adapters == ("kind", "terse") and catalog.presets == ("gentle",)
        assert collect(arena, chat("gentle"))  # the arena sends a preset as `model`: it streams like any model
    finally:
        arena.registry.remove_preset("gentle")


def test_streams_for_adapter_blend_and_steering_differ_from_the_base(arena):
    base = arena.registry.engine.base.name
    texts = {
        "base": collect(arena, chat(base)),
        "kind": collect(arena, chat("kind")),
        "blend": collect(arena, chat(base, adapters=[{"name": "kind", "weight": 0.5},
                                                     {"name": "terse", "weight": 0.5}])),
        "steer": collect(arena, chat(base, steering={"adapter": "kind", "coeff": 8.0})),
    }
    assert all(texts.values()), texts
    assert len(set(texts.values())) == 4, texts


@pytest.mark.parametrize("body", [chat("gone"), chat("kind", steering={"adapter": "gone", "coeff": 1.0})])
def test_an_unknown_adapter_is_an_api_error_the_ui_can_explain(arena, body):
    with pytest.raises(ApiError) as err:
        collect(arena, body)
    assert err.value.adapter_missing and "gone" in str(err.value)


def test_an_unreachable_server_is_one_clear_error():
    async def run():
        client = ArenaClient("http://127.0.0.1:9")  # the discard port: nothing listens
        try:
            await client.catalog()
        finally:
            await client.aclose()

    with pytest.raises(ApiError, match="cannot reach the API"):
        asyncio.run(run())
