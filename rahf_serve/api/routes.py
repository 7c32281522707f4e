"""Thin routers: each route parses, delegates to the engine, registry or serving layer, and returns."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from ..engine_api import ServingEngine
from ..registry import AdapterRegistry
from .protocol import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, PresetRequest
from .serving import OpenAIServing


def build_router(engine: ServingEngine, registry: AdapterRegistry) -> APIRouter:
    router = APIRouter()
    serving = OpenAIServing(engine, registry)
    base = engine.base

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return await serving.chat(body, request)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await serving.completion(body, request)

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        root = {"id": base.name, "object": "model", "created": 0, "owned_by": "rahf-serve", "root": base.hub_id,
                "parent": None}
        adapters = [{"id": a.name, "object": "model", "created": int(a.loaded_at), "owned_by": "rahf-serve",
                     "root": a.source, "parent": base.name} for a in registry.list()]
        presets = [{"id": p.name, "object": "model", "created": int(p.created_at), "owned_by": "rahf-serve",
                    "root": base.hub_id, "parent": base.name, "preset": p.spec} for p in registry.presets()]
        return {"object": "list", "data": [root, *adapters, *presets]}

    @router.get("/v1/adapters")
    async def list_adapters() -> dict[str, Any]:
        return {"object": "list", "data": [a.describe() for a in registry.list()]}

    @router.post("/v1/adapters", status_code=201)
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        # Reading files (and a Hub download) happens in a worker thread, so streams keep flowing.
        info = await asyncio.to_thread(registry.load, body.name, body.source, confined=True)
        return info.describe()

    @router.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        await asyncio.to_thread(registry.unload, name)
        return {"id": name, "object": "adapter", "deleted": True}

    @router.get("/v1/presets")
    async def list_presets() -> dict[str, Any]:
        return {"object": "list", "data": [p.describe() for p in registry.presets()]}

    @router.post("/v1/presets", status_code=201)
    async def add_preset(body: PresetRequest) -> dict[str, Any]:
        selection = body.selection()
        preset = registry.add_preset(body.name, selection.blend(), selection.steering_spec(), selection.describe())
        return preset.describe()

    @router.delete("/v1/presets/{name}")
    async def remove_preset(name: str) -> dict[str, Any]:
        registry.remove_preset(name)
        return {"id": name, "object": "preset", "deleted": True}

    @router.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "base": base.name, "adapters": len(registry.list())}

    @router.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    return router
