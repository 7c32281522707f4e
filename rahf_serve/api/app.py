"""`create_app`: the FastAPI application over an engine and its registry (no process, no UI)."""

from __future__ import annotations

from fastapi import FastAPI

from ..engine_api import ServingEngine
from ..registry import AdapterRegistry
from .auth import ApiKeyMiddleware
from .errors import install_handlers
from .limits import DEFAULT_MAX_BODY_BYTES, BodyLimitMiddleware
from .routes import build_router


def create_app(engine: ServingEngine, registry: AdapterRegistry, *, api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    """The HTTP API. The caller starts and stops the engine; `api_key` guards every route, mounts included."""
    app = FastAPI(title="rahf-serve", description="OpenAI-compatible serving of RAHF adapters")
    install_handlers(app)
    app.include_router(build_router(engine, registry))
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    # Added last, so outermost: a client without the key is refused before its body is read.
    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)
    return app
