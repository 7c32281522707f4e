"""Push a bundle to the loopback Hub, pull it back by `org/name@revision`, compare every byte."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import random_lora_bundle

REPO = "rahf-test/tiny-scit"


def test_push_to_new_branch_then_pull_by_revision_is_byte_identical(hub, hub_server, tiny_base, tmp_path):
    bundle = random_lora_bundle(tiny_base, tmp_path / "tiny-scit")
    cache = tmp_path / "empty-cache"
    pushed, pulled = hub.call(
        {"fn": "push", "bundle": str(bundle), "repo_id": REPO, "kwargs": {"revision": "v1", "commit_message": "v1"}},
        {"fn": "download", "spec": f"{REPO}@v1", "cache_dir": str(cache)},
        HF_TOKEN="hf_test_token_from_env",
    )
    assert pushed["ok"], pushed
    sha = pushed["url"].rsplit("/commit/", 1)[1]
    assert pushed["url"] == f"{hub_server.url}/{REPO}/commit/{sha}"
    assert pulled["ok"], pulled
    path = Path(pulled["path"])
    assert path == cache / "models--rahf-test--tiny-scit" / "snapshots" / sha
    local = sorted(p.name for p in bundle.iterdir())
    assert pulled["files"] == local == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                        "rahf.json", "rahf_vectors.safetensors"]
    for name in local:
        assert (path / name).read_bytes() == (bundle / name).read_bytes(), name
    assert pulled["has_steering"]
    # One commit for the whole bundle, on the new branch only; main keeps just the initial commit.
    assert len(hub_server.requests("POST", "/commit/")) == 1
    assert set(hub_server.files(REPO, "v1")) == {".gitattributes", *local}
    assert set(hub_server.files(REPO, "main")) == {".gitattributes"}
    # The safetensors went through the LFS batch API and its PUT, the rest inline in the commit.
    assert len(hub_server.requests("PUT", "/_lfs/")) == 2
    # The token came from HF_TOKEN, found by huggingface_hub itself, and went with every request.
    # (The LFS PUT goes to a storage URL the Hub signed, so it carries no token, as on huggingface.co.)
    hub_api = [auth for method, path, auth in hub_server.state.log if not path.startswith("/_lfs/")]
    assert hub_api and set(hub_api) == {"Bearer hf_test_token_from_env"}
