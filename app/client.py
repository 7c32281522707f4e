"""A small async client of the public rahf-serve API: what the arena needs, nothing more.

The UI talks to the runtime only through HTTP so that it works the same against the process
that mounts it and against a remote `rahf-serve`. httpx (a Gradio dependency) is enough: the
extra body fields `adapters` and `steering` are plain JSON, and SSE parsing is a few lines.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

# Generation can pause for a long time on a busy CPU (a long prompt in the batch), so only
# connecting has a short timeout.
_TIMEOUT = httpx.Timeout(connect=10.0, read=300.0, write=30.0, pool=30.0)


class ApiError(Exception):
    """An error the API answered with (OpenAI-shaped) or a failed connection, as one line."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code

    @property
    def adapter_missing(self) -> bool:
        """True when the request named an adapter the server no longer has (e.g. removed)."""
        return self.status == 404 or self.code in ("model_not_found", "adapter_not_found")


@dataclass(frozen=True)
class Catalog:
    """What GET /v1/models lists: the served base, the adapters on top of it and the named presets."""

    base: str
    adapters: tuple[str, ...]
    presets: tuple[str, ...] = ()
    """Blends and/or steering registered under a name (POST /v1/presets): used as `model`, never blended."""


def _error_from_body(status: int, body: bytes) -> ApiError:
    try:
        err = json.loads(body)["error"]
        return ApiError(str(err.get("message") or err), status=status, code=err.get("code"))
    except (ValueError, KeyError, TypeError):
        return ApiError(f"HTTP {status}: {body[:200].decode(errors='replace')}", status=status)


class ArenaClient:
    """One per mounted UI; holds a pooled connection for every session's requests."""

    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=_TIMEOUT)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def catalog(self) -> Catalog:
        try:
            resp = await self._http.get("/v1/models")
        except httpx.HTTPError as err:
            raise ApiError(f"cannot reach the API at {self._http.base_url}: {err}") from err
        if resp.status_code != 200:
            raise _error_from_body(resp.status_code, resp.content)
        models = resp.json()["data"]
        adapters = tuple(m["id"] for m in models if m.get("parent") and "preset" not in m)
        presets = tuple(m["id"] for m in models if "preset" in m)
        bases = [m["id"] for m in models if not m.get("parent")]
        if not bases:
            raise ApiError("GET /v1/models lists no base model")
        return Catalog(base=bases[0], adapters=adapters, presets=presets)

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[str]:
        """Yield the text deltas of one streamed chat completion; raise ApiError on any error.

        Leaving the iteration early (Stop, a closed browser tab) closes the response, which the
        server sees as a disconnect and stops generating for this request.
        """
        try:
            async with self._http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
                if resp.status_code != 200:
                    raise _error_from_body(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error after the stream started (e.g. adapter removed)
                        err = chunk["error"]
                        raise ApiError(str(err.get("message") or err), code=err.get("code"))
                    for choice in chunk.get("choices") or []:
                        text = (choice.get("delta") or {}).get("content")
                        if text:
                            yield text
        except httpx.HTTPError as err:
            raise ApiError(f"connection to the API failed: {err}") from err
