"""With --api-key, every route of the assembled app answers 401 without the key or with a wrong one.

tests/serving/test_api.py checks a hand-written list of API routes and a stand-in /ui mount. This
walks the routes of the real assembly (API + Gradio UI, as app/server.py builds it), mounts and
included routers recursively, so a route added later cannot slip through unguarded.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from app.ui import mount_ui
from rahf_serve.api import create_app
from tests.ui.server import serve_arena

KEY = "s3cret-key"
WRONG = [{}, {"Authorization": "Bearer wrong"}]
# Near misses, tried on a sample of routes (the machine is shared: ~40 ms a request under load).
NEAR_MISSES = [{"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"},
               {"Authorization": f"Bearer {KEY[:-1]}"}, {"Cookie": "rahf_api_key=wrong"}, {"X-Api-Key": KEY}]
SAMPLE = [("POST", "/v1/chat/completions"), ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/x"),
          ("GET", "/metrics"), ("GET", "/ui/"), ("POST", "/ui/gradio_api/queue/join")]


def walk(routes: list[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path) for every endpoint below `routes`, path parameters filled with a dummy value."""
    for route in routes:
        if hasattr(route, "original_router"):  # FastAPI's included router (Gradio uses them)
            yield from walk(route.original_router.routes, prefix + route.include_context.prefix)
        elif hasattr(route, "routes") and getattr(route, "routes", None) is not None and not hasattr(route, "endpoint"):
            yield from walk(route.routes, prefix + route.path)  # a Mount
        else:
            path = re.sub(r"\{[^}]+\}", "x", prefix + route.path)
            for method in sorted(getattr(route, "methods", None) or {"GET"}):
                yield method, path


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, lively_model_dir):
    with serve_arena(tmp_path_factory.mktemp("guarded"), lively_model_dir, api_key=KEY) as arena:
        yield arena


@pytest.fixture(scope="module")
def endpoints(guarded, tmp_path_factory) -> list[tuple[str, str]]:
    # The same assembly as the served app (tests/ui/server.py, as app/server.py): only its route table is read.
    twin = create_app(guarded.registry.engine, guarded.registry, api_key=KEY)
    mount_ui(twin, base_url=guarded.url, api_key=KEY, votes_path=tmp_path_factory.mktemp("twin") / "votes.jsonl")
    return sorted(set(walk(twin.routes)))


def test_the_walk_reaches_api_management_metrics_docs_and_ui(endpoints):
    paths = {p for _, p in endpoints}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/adapters", "/v1/adapters/x", "/v1/presets",
            "/v1/presets/x", "/health",
            "/metrics", "/openapi.json", "/docs", "/ui/", "/ui/config", "/ui/gradio_api/queue/join"} <= paths
    assert len(endpoints) > 60  # the Gradio app's own routes were walked, not just the mount point


def test_every_route_refuses_a_missing_or_wrong_key(guarded, endpoints):
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for method, path in endpoints:
            for headers in WRONG:
                r = http.request(method, path, headers=headers, params={"api_key": "nope"})
                assert r.status_code == 401, (method, path, headers, r.status_code)
                if method != "HEAD":
                    assert r.json()["error"]["code"] == "invalid_api_key"


def test_near_misses_of_the_key_are_refused(guarded):
    with httpx.Client(base_url=guarded.url, timeout=30) as http:
        for method, path in SAMPLE:
            for headers in NEAR_MISSES:
                assert http.request(method, path, headers=headers).status_code == 401, (method, path, headers)
            # The key in the query string is for a browser's first page load: a wrong one is refused too.
            assert http.request(method, path, params={"api_key": KEY + "x"}).status_code == 401


def test_undeclared_paths_are_401_too_not_404(guarded):
    # Refusing before routing means an attacker cannot even map which routes exist.
    r = httpx.get(guarded.url + "/no/such/route", timeout=30)
    assert r.status_code == 401


def test_the_right_key_opens_the_api_and_the_ui(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=guarded.url, timeout=60, headers=auth) as http:
        for path in ("/health", "/metrics", "/v1/models", "/v1/adapters", "/openapi.json", "/ui/", "/ui/config"):
            assert http.get(path).status_code == 200, path
        r = http.post("/v1/chat/completions", json={"model": "kind", "messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2})
        assert r.status_code == 200
        assert http.delete("/v1/adapters/not-loaded").status_code == 404  # past auth, into the route
    assert sorted(guarded.registry.engine.adapters) == ["kind", "terse"]  # no unauthorised call changed anything
