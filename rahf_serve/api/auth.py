"""`--api-key`: one ASGI middleware in front of everything, mounted apps (the UI) included.

API clients send `Authorization: Bearer KEY`. A browser cannot add headers to a page load, so the
UI may also be opened once with `?api_key=KEY`; the key is then kept in an HttpOnly cookie.
"""

from __future__ import annotations

import hmac
import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

from .errors import error_body

COOKIE = "rahf_api_key"
Scope = dict[str, Any]


class ApiKeyMiddleware:
    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self._key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        query_key = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("api_key", [None])[0]
        if self._ok(_bearer(scope)) or self._ok(_cookie(scope)):
            return await self.app(scope, receive, send)
        if self._ok(query_key):
            return await self.app(scope, receive, _with_cookie(send, query_key))
        await _deny(scope, send)

    def _ok(self, candidate: str | None) -> bool:
        return candidate is not None and hmac.compare_digest(candidate.encode(), self._key)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _bearer(scope: Scope) -> str | None:
    value = _header(scope, b"authorization") or ""
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _cookie(scope: Scope) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    morsel = SimpleCookie(raw).get(COOKIE)
    return morsel.value if morsel else None


def _with_cookie(send: Any, key: str) -> Any:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            cookie = f"{COOKIE}={key}; HttpOnly; SameSite=Strict; Path=/".encode("latin-1")
            message = {**message, "headers": [*message.get("headers", []), (b"set-cookie", cookie)]}
        await send(message)

    return wrapped


async def _deny(scope: Scope, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(error_body(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 "invalid_api_key")).encode()
    await send({"type": "http.response.start", "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
    await send({"type": "http.response.body", "body": body})
