"""Adapter management over HTTP: hot load while others stream, unload, and every refusal a clear 4xx."""

from __future__ import annotations

import os
import shutil
import threading

import httpx
import openai
import pytest

from rahf_serve.models import load_base
from tests.conftest import build_tiny_model_dir
from tests.helpers import random_lora_bundle


def post(server, name: str, source: str) -> httpx.Response:
    return httpx.post(server.url + "/v1/adapters", json={"name": name, "source": source}, timeout=60)


def test_hot_load_while_streaming_then_unload(server, client, runtime):
    engine, _ = runtime
    chunks: list[str] = []
    done = threading.Event()

    def stream() -> None:
        for c in client.completions.create(model="kind", prompt="Go", max_tokens=48, temperature=0, stream=True):
            chunks.append(c.choices[0].finish_reason or "")
        done.set()

    reader = threading.Thread(target=stream)
    reader.start()
    r = post(server, "kind2", "kind")
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "kind2" and r.json()["steering_layers"] == [1, 2]
    reader.join(60)
    assert done.is_set() and chunks[-1] in ("stop", "length")
    same = [client.completions.create(model=m, prompt="Hi", max_tokens=6, temperature=0).choices[0].text
            for m in ("kind", "kind2")]
    assert same[0] == same[1]  # the same bundle under two names
    assert "kind2" in [a["name"] for a in httpx.get(server.url + "/v1/adapters").json()["data"]]
    assert post(server, "kind2", "kind").status_code == 409
    r = httpx.delete(server.url + "/v1/adapters/kind2")
    assert r.status_code == 200 and r.json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="kind2", prompt="Hi", max_tokens=2)
    assert httpx.delete(server.url + "/v1/adapters/kind2").status_code == 404


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "a\\b", "_hidden", "x" * 65, "a..b"])
def test_bad_names_are_400(server, name):
    r = post(server, name, "kind")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_adapter_name"


def test_local_paths_outside_the_adapter_dir_are_refused(server, adapter_dir, tmp_path):
    outside = shutil.copytree(adapter_dir / "kind", tmp_path / "outside")
    r = post(server, "out1", str(outside))
    assert r.status_code == 403 and r.json()["error"]["code"] == "adapter_source_forbidden"
    assert post(server, "out2", "../" + outside.parent.name + "/outside").status_code in (403, 404)
    os.symlink(outside, adapter_dir / "link-out")
    assert post(server, "out3", "link-out").status_code == 403
    sneaky = shutil.copytree(adapter_dir / "kind", adapter_dir / "sneaky")
    (sneaky / "adapter_model.safetensors").unlink()
    os.symlink(outside / "adapter_model.safetensors", sneaky / "adapter_model.safetensors")
    assert post(server, "out4", "sneaky").status_code == 403


def test_bad_bundles_are_4xx_and_the_server_keeps_serving(server, client, runtime, adapter_dir, tmp_path, tokenizer):
    engine, _ = runtime
    corrupt = shutil.copytree(adapter_dir / "kind", adapter_dir / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    pickled = shutil.copytree(adapter_dir / "kind", adapter_dir / "pickled")
    (pickled / "adapter_model.bin").write_bytes(b"not really a pickle")
    other = load_base(str(build_tiny_model_dir(tmp_path / "other", tokenizer, num_hidden_layers=2)), device="cpu")
    random_lora_bundle(other, adapter_dir / "foreign", seed=5)
    cases = {"corrupt": (400, "corrupt_adapter"), "pickled": (400, "unsafe_adapter_file"),
             "foreign": (400, "base_model_mismatch"), "missing": (404, "adapter_not_found")}
    for source, (status, code) in cases.items():
        r = post(server, "x-" + source, source)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert [m.id for m in client.models.list().data].count("x-corrupt") == 0
    ok = client.chat.completions.create(model="kind", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert ok.usage.completion_tokens >= 1
