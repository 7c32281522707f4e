"""A repo holding only a plain PEFT LoRA (as PEFT itself saves it) serves as an adapter, without steering."""

from __future__ import annotations

import copy
from pathlib import Path

from peft import LoraConfig, get_peft_model

from tests.helpers import random_lora_bundle

REPO = "rahf-test/tiny-lora"


def test_plain_peft_push_replaces_a_bundle_and_pulls_without_steering(hub, hub_server, tiny_base, tmp_path):
    rahf = random_lora_bundle(tiny_base, tmp_path / "rahf")
    peft_dir = tmp_path / "peft"
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(tiny_base.model), config).save_pretrained(peft_dir)
    assert sorted(p.name for p in peft_dir.iterdir()) == ["README.md", "adapter_config.json",
                                                          "adapter_model.safetensors"]

    hub.home.mkdir(parents=True)
    (hub.home / "token").write_text("hf_from_login_cache")  # where `hf auth login` keeps it
    first, second, pulled = hub.call(
        {"fn": "push", "bundle": str(rahf), "repo_id": REPO},
        {"fn": "push", "bundle": str(peft_dir), "repo_id": REPO, "kwargs": {"private": True}},
        {"fn": "download", "spec": REPO},
    )
    assert first["ok"] and second["ok"] and first["url"] != second["url"]
    # The second push deleted the first one's steering files in its own commit: no stale manifest.
    assert set(hub_server.files(REPO)) == {".gitattributes", "README.md", "adapter_config.json",
                                           "adapter_model.safetensors"}
    assert pulled["ok"] and not pulled["has_steering"], pulled
    assert pulled["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in pulled["files"]:
        assert (Path(pulled["path"]) / name).read_bytes() == (peft_dir / name).read_bytes()
    # `private` applies when the repo is created; an existing repo keeps its visibility (exist_ok).
    assert hub_server.state.repos[REPO].private is False
    # With no HF_TOKEN set, huggingface_hub found the login cache's token on its own.
    assert {auth for _, path, auth in hub_server.state.log if not path.startswith("/_lfs/")} == {
        "Bearer hf_from_login_cache"}
