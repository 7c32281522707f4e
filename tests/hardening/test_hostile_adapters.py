"""Hostile bundles through POST /v1/adapters on a live server: each a clear 4xx, the server unaffected.

tests/serving/test_adapters_api.py already covers bad names, paths and symlinks leading out of
--adapter-dir, a corrupt header, an `adapter_model.bin`, a wrong base and a missing bundle. This
adds the refusals it does not reach over HTTP: the other pickle suffixes, rank and size limits,
a bundle matching no module, a config that is not JSON, a pickle smuggled in by a symlink.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from rahf_serve.bundle import DEFAULT_MAX_BYTES

HELLO = [{"role": "user", "content": "hi"}]


def clone(adapter_dir: Path, name: str) -> Path:
    return Path(shutil.copytree(adapter_dir / "kind", adapter_dir / name))


def edit_config(bundle: Path, **changes) -> None:
    config = json.loads((bundle / "adapter_config.json").read_text())
    (bundle / "adapter_config.json").write_text(json.dumps({**config, **changes}))


def pickle_pt(b: Path) -> None:
    (b / "adapter_model.pt").write_bytes(b"\x80\x04K\x01.")  # a valid pickle of the int 1


def pickle_pkl(b: Path) -> None:
    (b / "extra.pkl").write_bytes(b"\x80\x04K\x01.")


def rank_above_limit(b: Path) -> None:
    edit_config(b, r=100_000)


def oversize(b: Path) -> None:
    # Sparse: the size check reads st_size, so this costs no disk.
    with open(b / "padding.safetensors", "wb") as fh:
        fh.truncate(DEFAULT_MAX_BYTES + 1)


def matches_no_module(b: Path) -> None:
    edit_config(b, target_modules=["no_such_proj"])
    from safetensors.torch import load_file, save_file

    weights = load_file(b / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "no_such_proj").replace("v_proj", "no_such_proj2"): v
               for k, v in weights.items()}, b / "adapter_model.safetensors")


def config_not_json(b: Path) -> None:
    (b / "adapter_config.json").write_bytes(b"\xff\xfe{")


def truncated_header(b: Path) -> None:
    # A header length that claims more bytes than the file has.
    (b / "adapter_model.safetensors").write_bytes((10**9).to_bytes(8, "little") + b"{}")


CASES = {
    "pt": (pickle_pt, 400, "unsafe_adapter_file"),
    "pkl": (pickle_pkl, 400, "unsafe_adapter_file"),
    "rank": (rank_above_limit, 400, "adapter_limit_exceeded"),
    "oversize": (oversize, 400, "adapter_limit_exceeded"),
    "nomatch": (matches_no_module, 400, "adapter_matches_nothing"),
    "badjson": (config_not_json, 400, "corrupt_adapter"),
    "header": (truncated_header, 400, "corrupt_adapter"),
}


def post(server, name: str, source: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/adapters", json={"name": name, "source": source}, timeout=60)


def assert_still_serves(server, runtime) -> None:
    engine, registry = runtime
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"model": "kind", "messages": HELLO, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert sorted(engine.adapters) == ["kind", "terse"] == [a.name for a in registry.list()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_bundle_is_a_clear_4xx(server, runtime, adapter_dir, case):
    damage, status, code = CASES[case]
    damage(clone(adapter_dir, "h-" + case))
    r = post(server, "h-" + case, "h-" + case)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert_still_serves(server, runtime)


def test_pickle_behind_a_symlink_inside_the_dir_is_refused(server, runtime, adapter_dir):
    # The link stays inside --adapter-dir, so only the suffix check can stop it.
    b = clone(adapter_dir, "h-linked-pickle")
    (adapter_dir / "payload.data").write_bytes(b"\x80\x04K\x01.")
    os.symlink(adapter_dir / "payload.data", b / "adapter_model.bin")
    r = post(server, "h-linked-pickle", "h-linked-pickle")
    assert (r.status_code, r.json()["error"]["code"]) == (400, "unsafe_adapter_file")
    assert_still_serves(server, runtime)


def test_absolute_path_to_a_system_folder_is_forbidden(server, runtime):
    r = post(server, "h-etc", "/etc")
    assert (r.status_code, r.json()["error"]["code"]) == (403, "adapter_source_forbidden")
    assert_still_serves(server, runtime)


@pytest.mark.parametrize("source", ["a" * 300, "kind/" + "b" * 300, "c" * 300 + "/b", "\x00", "kind\x00/../../etc"])
def test_sources_the_filesystem_rejects_are_4xx(server, runtime, source):
    # Names too long for the filesystem or with NUL bytes make os.stat raise, not return False.
    r = post(server, "h-odd", source)
    assert 400 <= r.status_code < 500 and r.json()["error"]["code"] in ("adapter_not_found", "invalid_adapter")
    assert_still_serves(server, runtime)
