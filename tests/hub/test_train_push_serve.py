"""The acceptance path: train a bundle, `rahf-train run --push-to-hub`, `rahf-train push`, then
`rahf-serve --adapter org/name@rev` pulls it into an empty cache and serves it exactly like the local folder.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml

from tests.hub.conftest import ROOT, free_port

REPO = "rahf-test/tiny-scit"
COPY = "rahf-test/tiny-scit-copy"


def _fast_config(path: Path) -> Path:
    """The shipped tiny config with fewer steps: this test checks the round trip, not the training."""
    cfg = yaml.safe_load((ROOT / "training" / "configs" / "tiny.yaml").read_text())
    cfg["phase1"]["steps"], cfg["align"]["steps"] = 1, 2
    path.write_text(yaml.safe_dump(cfg))
    return path


def _pairs(path: Path) -> Path:
    pairs = [{"prompt": f"Question {i}: how should I answer a rude email?", "chosen": f"Calmly and kindly ({i}).",
              "rejected": f"With insults ({i})."} for i in range(8)]
    path.write_text(json.dumps(pairs))
    return path


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"rahf-serve exited:\n{log.read_text()[-4000:]}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"rahf-serve did not come up:\n{log.read_text()[-4000:]}")


def test_trained_bundle_round_trips_through_the_hub_and_serves_identically(hub, hub_server, tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train = hub.run([sys.executable, "-m", "training.cli", "run", "--base", str(tiny_model_dir),
                     "--data", str(_pairs(tmp_path / "pairs.json")), "--config", str(_fast_config(tmp_path / "c.yaml")),
                     "--out", str(out), "--push-to-hub", REPO], HF_TOKEN="hf_test")
    assert train.returncode == 0, train.stderr[-4000:]
    assert train.stdout.strip().splitlines()[-1].startswith(f"{hub_server.url}/{REPO}/commit/")
    bundle = out / "bundle"

    push = hub.run([sys.executable, "-m", "training.cli", "push", str(bundle), COPY, "--revision", "v1", "--private",
                    "--commit-message", "tiny scit, 1+2 steps"], HF_TOKEN="hf_test")
    assert push.returncode == 0, push.stderr[-4000:]
    sha = push.stdout.strip().splitlines()[-1].rsplit("/commit/", 1)[1]
    assert hub_server.state.repos[COPY].private and hub_server.state.repos[COPY].branches["v1"] == sha
    assert not hub.cache.exists()  # pushing downloads nothing: the serve below starts from an empty cache

    port, log = free_port(), tmp_path / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.server", "--base", str(tiny_model_dir), "--adapter", f"local={bundle}",
             "--adapter", f"hub={COPY}@v1", "--adapter-dir", str(tmp_path / "no-adapters"), "--port", str(port),
             "--no-ui", "--device", "cpu", "--dtype", "float32"],
            cwd=ROOT, env=hub.env(), stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, proc, log)
        snapshot = hub.cache / "models--rahf-test--tiny-scit-copy" / "snapshots" / sha
        assert sorted(p.name for p in snapshot.iterdir()) == sorted(p.name for p in bundle.iterdir())
        for local_file in bundle.iterdir():
            assert (snapshot / local_file.name).read_bytes() == local_file.read_bytes(), local_file.name

        # POST /v1/adapters takes Hub specs too; a missing repo is the API's 404 with the Hub error code.
        loaded = httpx.post(f"{url}/v1/adapters", json={"name": "hub-main", "source": REPO}, timeout=60)
        assert loaded.status_code == 201, loaded.text
        missing = httpx.post(f"{url}/v1/adapters", json={"name": "nope", "source": "rahf-test/missing"}, timeout=60)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "hub_repo_not_found", missing.text

        adapters = {a["name"]: a for a in httpx.get(f"{url}/v1/adapters").json()["data"]}
        assert adapters["hub"]["source"] == f"{COPY}@v1"
        assert adapters["hub"]["steering_layers"] == adapters["local"]["steering_layers"] != []

        def complete(model: str, steering: dict | None = None) -> tuple[str, int]:
            body = {"model": model, "prompt": "How should I answer a rude email?", "max_tokens": 12,
                    "temperature": 0}
            if steering:
                body["steering"] = steering
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"], r.json()["usage"]["completion_tokens"]

        local = complete("local")
        assert local[1] > 0
        assert complete("hub") == complete("hub-main") == local
        steered = complete("local", {"adapter": "local", "coeff": 4.0})
        assert steered != local  # the vectors matter, so the next comparison shows the pulled ones are the same
        assert complete("hub", {"adapter": "hub", "coeff": 4.0}) == steered
    finally:
        proc.terminate()
        proc.wait(timeout=30)
