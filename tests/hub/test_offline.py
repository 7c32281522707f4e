"""Offline (HF_HUB_OFFLINE=1, or no network): a cached revision loads; an uncached one, or a push, is HubOffline."""

from __future__ import annotations

from tests.helpers import random_lora_bundle
from tests.hub.conftest import dead_endpoint


def test_cached_revision_loads_offline_and_uncached_one_is_hub_offline(hub, hub_server, tiny_base, tmp_path):
    bundle = random_lora_bundle(tiny_base, tmp_path / "b")
    files = {p.name: p.read_bytes() for p in bundle.iterdir()}
    v1 = hub_server.seed("rahf-test/tiny", files, branch="v1")
    hub_server.seed("rahf-test/tiny", files, branch="v2")
    (online,) = hub.call({"fn": "download", "spec": "rahf-test/tiny@v1"})
    assert online["ok"] and online["path"].endswith(v1), online

    before = len(hub_server.state.log)
    by_branch, by_sha, uncached, push = hub.call({"fn": "resolve", "spec": "rahf-test/tiny@v1"},
                                                 {"fn": "download", "spec": f"rahf-test/tiny@{v1}"},
                                                 {"fn": "download", "spec": "rahf-test/tiny@v2"},
                                                 {"fn": "push", "bundle": str(bundle), "repo_id": "rahf-test/new"},
                                                 offline=True)
    assert len(hub_server.state.log) == before  # offline means not one request
    assert by_branch["ok"] and by_sha["ok"] and by_branch["path"] == by_sha["path"] == online["path"]
    assert by_branch["has_steering"]
    assert (uncached["error"], uncached["status"], uncached["code"]) == ("HubOffline", 503, "hub_offline")
    assert "rahf-test/tiny@v2 is not in the cache" in uncached["message"]
    assert "HF_HUB_OFFLINE=1" in uncached["message"]
    assert (push["error"], push["status"]) == ("HubOffline", 503) and "HF_HUB_OFFLINE=1" in push["message"], push

    no_network = dead_endpoint()
    cached, uncached = hub.call({"fn": "download", "spec": "rahf-test/tiny@v1"},
                                {"fn": "download", "spec": "rahf-test/tiny@v2"}, endpoint=no_network)
    assert cached["ok"] and cached["path"] == online["path"], cached
    assert uncached["error"] == "HubOffline" and f"cannot connect to {no_network}" in uncached["message"], uncached
