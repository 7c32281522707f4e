"""Each way a Hub pull or push can fail is its own error, with the HTTP status the API will answer."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import random_lora_bundle


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_pull_errors_are_distinct(hub, hub_server, tiny_base, tmp_path):
    hub_server.seed("rahf-test/tiny", _files(random_lora_bundle(tiny_base, tmp_path / "tiny")))
    # A PEFT adapter saved the old way (pickle) and a full model: neither is a bundle rahf-serve loads.
    hub_server.seed("rahf-test/pickle-peft", {"adapter_config.json": b'{"peft_type": "LORA", "r": 4}',
                                              "adapter_model.bin": b"\x80\x04 not really a pickle"})
    hub_server.seed("rahf-test/full-model", {"config.json": b"{}", "model.safetensors": b"\0" * 16})
    hub_server.state.fail.update({"rahf-test/down": 500, "rahf-test/forbidden": 403})
    cases = [
        ("rahf-test/missing", "HubRepoNotFound", 404, "hub_repo_not_found", "Hub repo rahf-test/missing not found"),
        ("rahf-test/tiny@no-such-branch", "HubRevisionNotFound", 404, "hub_revision_not_found",
         "has no revision 'no-such-branch'"),
        (f"rahf-test/tiny@{'0' * 40}", "HubRevisionNotFound", 404, "hub_revision_not_found", "has no revision '000"),
        ("rahf-test/pickle-peft", "NotABundleRepo", 400, "not_an_adapter_repo",
         "is not a RAHF/PEFT adapter bundle: it has no adapter_model.safetensors"),
        ("rahf-test/full-model", "NotABundleRepo", 400, "not_an_adapter_repo",
         "it has no adapter_config.json or adapter_model.safetensors"),
        # The Hub answered, so these are not "offline", although huggingface_hub then looks in the cache.
        ("rahf-test/down", "HubError", 502, "hub_error", "Hub request for rahf-test/down failed: Server error '500"),
        ("rahf-test/forbidden", "HubAccessDenied", 403, "hub_access_denied", "not allowed to read Hub repo"),
    ]
    results = hub.call(*({"fn": "download", "spec": spec} for spec, *_ in cases))
    for (spec, error, status, code, text), got in zip(cases, results, strict=True):
        assert not got["ok"], spec
        assert (got["error"], got["status"], got["code"]) == (error, status, code), got
        assert text in got["message"], got["message"]
    # Pickle weights are never downloaded, not even to be rejected afterwards.
    assert not [path for _, path, _ in hub_server.state.log if path.endswith(".bin")]


def test_push_errors(hub, hub_server, tiny_base, tmp_path):
    bad_card = random_lora_bundle(tiny_base, tmp_path / "bad-card")
    (bad_card / "README.md").write_text("---\nbase_model: [unclosed\n---\n# card\n")
    not_a_bundle = tmp_path / "not-a-bundle"
    not_a_bundle.mkdir()
    (not_a_bundle / "adapter_config.json").write_text("{}")

    card, missing = hub.call({"fn": "push", "bundle": str(bad_card), "repo_id": "rahf-test/bad-card"},
                             {"fn": "push", "bundle": str(not_a_bundle), "repo_id": "rahf-test/nope"})
    # The Hub rejects the card's YAML before any weight is uploaded or any commit made.
    assert (card["error"], card["status"]) == ("CorruptBundleError", 400), card
    assert "Invalid metadata in README.md" in card["message"]
    assert not hub_server.requests("PUT") and not hub_server.requests("POST", "/commit/")
    # A folder that is not a bundle is refused locally: the Hub never sees the repo.
    assert missing["error"] == "CorruptBundleError" and "adapter_model.safetensors is missing" in missing["message"]
    assert "rahf-test/nope" not in hub_server.state.repos
