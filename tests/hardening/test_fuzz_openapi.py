"""Schema-based fuzzing: requests generated from the server's own OpenAPI document, valid and invalid.

Every answer must come within the timeout (no hang) and be no 500; a 5xx is allowed only for the
overload and offline cases the API documents on purpose. The examples are derandomized so CI
failures reproduce; raise FUZZ_EXAMPLES (per operation and mode) to search longer locally.
"""

from __future__ import annotations

import os

import httpx
import huggingface_hub.constants
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
DELIBERATE_5XX = {"queue_full", "hub_offline", "engine_stopped"}


@pytest.fixture
def offline(monkeypatch):
    # A generated `source` may look like a Hub repo `org/name`: never reach the network from a test.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def name_a_served_model(pair):
    case, model = pair
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = model
    return case


def operations(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations()]


def test_the_schema_lists_every_api_route(server):
    labels = {op.label for op in operations(server)}
    assert {"POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/adapters",
            "POST /v1/adapters", "DELETE /v1/adapters/{name}", "GET /v1/presets", "POST /v1/presets",
            "DELETE /v1/presets/{name}", "GET /health", "GET /metrics"} <= labels


def test_no_500_and_no_hang_on_generated_requests(server, runtime, offline):
    engine, _ = runtime
    seen: dict[int, int] = {}
    generated: dict[str, int] = {}
    # Random `model` strings are all 404s; a third of the cases name a served model, so the fuzzer
    # reaches tokenization, blending, steering and generation too.
    served = st.sampled_from([engine.base.name, "kind", "terse"])
    for op in operations(server):
        positive = op.as_strategy(GenerationMode.POSITIVE)
        strategy = st.one_of(st.tuples(positive, served).map(name_a_served_model), positive,
                             op.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def check(case) -> None:
            # A hang fails as a timeout exception from `requests`, not as a stuck CI job.
            response = case.call(base_url=server.url, timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            if response.status_code == 200 and "completions" in case.path:
                generated[case.path] = generated.get(case.path, 0) + 1
            assert response.status_code != 500, (case.as_curl_command(), response.text[:300])
            if response.status_code >= 500:
                assert response.json()["error"]["code"] in DELIBERATE_5XX, response.text[:300]
            if response.status_code >= 400:
                assert response.json()["error"]["message"], response.text[:300]

        check()
    # The fuzzer reached both sides: requests that were served and requests that were refused.
    assert any(200 <= s < 300 for s in seen) and any(400 <= s < 500 for s in seen), seen
    assert set(generated) == {"/v1/chat/completions", "/v1/completions"}, generated
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": engine.base.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
