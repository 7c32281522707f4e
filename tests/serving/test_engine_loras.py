"""LoRA slots in the engine: more adapters than slots, full slots, and the rank limit (--max-lora-rank)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from rahf_serve.api import create_app
from rahf_serve.engine import Engine
from rahf_serve.errors import LimitExceeded
from rahf_serve.registry import AdapterRegistry
from rahf_serve.request import GenerationRequest
from rahf_serve.sampling import SamplingParams
from tests.helpers import random_lora_bundle
from tests.serving.conftest import LiveServer, burst, load_lively

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
NAMES = ["a0", "a1", "a2", "a3"]


@pytest.fixture(scope="module")
def four_bundles(tmp_path_factory, lively_model_dir) -> Path:
    base = load_lively(lively_model_dir)
    root = tmp_path_factory.mktemp("four")
    for i, name in enumerate(NAMES):
        random_lora_bundle(base, root / name, seed=200 + i, r=4, with_vectors=False)
    return root


def engine_with(lively_model_dir: Path, bundles: Path, **kwargs) -> Engine:
    engine = Engine(load_lively(lively_model_dir), **kwargs)
    AdapterRegistry(engine, bundles).load_dir()
    return engine


def requests(prompts: list[list[int]], adapters: list[str | None], blends=()) -> list[GenerationRequest]:
    out = [GenerationRequest(p, GREEDY, a) for p, a in zip(prompts, adapters, strict=True)]
    return out + [GenerationRequest([5, 6, 7, 8], GREEDY, blend=b) for b in blends]


def test_more_adapters_than_slots_equal_enough_slots(lively_model_dir, four_bundles):
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15, 16]]
    reqs = requests(prompts, [*NAMES, None], blends=[(("a0", 0.6), ("a3", -0.8))])
    with engine_with(lively_model_dir, four_bundles, max_loras=8) as roomy:
        expected, _ = burst(roomy, reqs)
    assert len({tuple(t) for t in expected}) == len(expected)  # each adapter and the blend change the output

    with engine_with(lively_model_dir, four_bundles, max_loras=2) as tight:
        assert len(tight._slots.resident) == 2  # the first two pre-loaded, the rest on demand
        got, _ = burst(tight, reqs)
        assert got == expected
        again, _ = burst(tight, list(reversed(reqs)))  # reloaded from host memory, in another order
        assert again == list(reversed(expected))
        assert len(tight._slots.resident) == 2 and tight._slots._pins.total() == 0


def test_a_request_finding_every_slot_pinned_waits_then_equals_alone(lively_model_dir, four_bundles):
    first = GenerationRequest([1, 2, 3], GREEDY, "a0")
    second = GenerationRequest([4, 5, 6, 7], GREEDY, "a1")
    with engine_with(lively_model_dir, four_bundles, max_loras=1) as engine:
        alone = [engine.generate(first).token_ids, engine.generate(second).token_ids]
        got, log = burst(engine, [first, second])
    assert got == alone
    order = [i for i, _ in log]
    # The second starts only after the first released the one slot (it waited, it was not refused).
    assert order.index(1) > max(k for k, i in enumerate(order) if i == 0)


def test_a_blend_above_the_rank_limit_is_a_400_naming_the_flag(lively_model_dir, four_bundles):
    with engine_with(lively_model_dir, four_bundles, max_lora_rank=6) as engine:
        fits = GenerationRequest([1, 2, 3], GREEDY, blend=(("a0", 1.0), ("a1", 0.0)))  # zero weight: left out
        assert engine.generate(fits).error is None
        with pytest.raises(LimitExceeded, match=r"rank 8 .*--max-lora-rank 6"):
            engine.submit(GenerationRequest([1, 2, 3], GREEDY, blend=(("a0", 1.0), ("a1", 0.5))), lambda e: None)
        registry = AdapterRegistry(engine, four_bundles)
        with LiveServer(create_app(engine, registry)) as live:
            r = httpx.post(live.url + "/v1/completions", timeout=60,
                           json={"model": engine.base.name, "prompt": "Hi", "max_tokens": 2,
                                 "adapters": [{"name": "a0", "weight": 1.0}, {"name": "a1", "weight": 0.5}]})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "adapter_limit_exceeded" and "--max-lora-rank" in r.json()["error"]["message"]


def test_an_adapter_above_the_rank_limit_fails_at_load(lively_model_dir, four_bundles):
    engine = Engine(load_lively(lively_model_dir), max_lora_rank=2)
    registry = AdapterRegistry(engine, four_bundles)
    with engine:
        with pytest.raises(LimitExceeded, match=r"rank 4 .*--max-lora-rank 2"):
            registry.load("a0", str(four_bundles / "a0"))
        assert engine.adapters == [] and registry.list() == []
        with LiveServer(create_app(engine, registry)) as live:
            r = httpx.post(live.url + "/v1/adapters", json={"name": "a1", "source": "a1"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "adapter_limit_exceeded"
    assert "--max-lora-rank" in r.json()["error"]["message"]
