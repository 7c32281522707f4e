"""lm-evaluation-harness against a live `rahf-serve`: what a user runs to judge a served model.

The server is the real console entry point on loopback with the real default model, the shipped
adapters and a preset given with --preset; lm_eval runs as its own process, offline, on the task files
in tests/data/lm_eval. The log-likelihoods the harness received (its --log_samples output) must equal
a direct computation in this process: plain PEFT on the plain base, the blend merged by hand, steering
as a hand-written hook, one unpadded sequence at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rahf_serve.bundle import read_bundle
from rahf_serve.models import BaseModel, load_base
from tests.helpers import merged_bundles, steered_by_hand, token_logprobs
from tests.serving.conftest import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "data" / "lm_eval"
DUAL, SCIT = "smollm2-135m-rahf-dual", "smollm2-135m-rahf-scit"
PRESET = {"adapters": [{"name": DUAL, "weight": 0.7}, {"name": SCIT, "weight": 0.5}],
          "steering": {"adapter": SCIT, "coeff": 4.0, "layers": [12, 14, 16]}}
LIMIT = 2  # documents: 4 log-likelihood requests per model, sent as lists of 2 token-id prompts


@pytest.fixture(scope="module")
def served(real_model_dir) -> Iterator[str]:
    port = free_port()
    cmd = [sys.executable, "-m", "app.server", "--no-ui", "--port", str(port), "--device", "cpu", "--threads", "1",
           "--adapter-dir", str(ROOT / "adapters"), "--preset", "gentle=" + json.dumps(PRESET)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "rahf-serve did not come up"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def lm_eval(url: str, model: str, out: Path, tokenizer: Path, *, chat: bool = False) -> subprocess.Popen:
    endpoint, kind, task = (("chat/completions", "local-chat-completions", "hh_harmless_gen") if chat else
                            ("completions", "local-completions", "hh_harmless_pref"))
    args = f"model={model},base_url={url}/v1/{endpoint},max_retries=1"
    if not chat:  # the harness tokenizes with the served model's own tokenizer, read from disk
        args += f",tokenizer_backend=huggingface,tokenizer={tokenizer}"
    cmd = [str(Path(sys.executable).parent / "lm_eval"), "--model", kind, "--model_args", args,
           "--tasks", task, "--include_path", str(TASKS), "--limit", str(LIMIT if not chat else 2),
           "--batch_size", "1" if chat else str(LIMIT), "--log_samples", "--output_path", str(out), "--seed", "0"]
    if chat:
        cmd.append("--apply_chat_template")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache")}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def samples(out: Path, task: str) -> list[dict]:
    [path] = out.rglob(f"samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def results(out: Path) -> dict:
    [path] = out.rglob("results_*.json")
    return json.loads(path.read_text())["results"]


@pytest.fixture(scope="module")
def harness(served, real_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Every lm_eval run at once (the server batches their requests together); model -> output dir."""
    runs = {name: tmp_path_factory.mktemp(name) for name in ("base", DUAL, "gentle", "chat")}
    base = httpx.get(served + "/v1/models").json()["data"][0]["id"]
    procs = {name: lm_eval(served, {"base": base, "chat": "gentle"}.get(name, name), out, real_model_dir,
                           chat=name == "chat")
             for name, out in runs.items()}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"lm_eval for {name} failed:\n{output[-3000:]}"
    return runs


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of a request into context and continuation tokens (TemplateLM._encode_pair)."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return ctx, whole[len(ctx):]


@pytest.fixture(scope="module")
def plain(real_model_dir) -> BaseModel:
    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    base.model.eval()
    return base


def in_process(base: BaseModel, selection: dict | None, requests: list[tuple[str, str]]) -> list[float]:
    """Sum of log p(continuation | context) for each request, computed directly on the real model."""
    model = base.model
    vectors: dict = {}
    if selection is not None:
        bundles = {c["name"]: ROOT / "adapters" / c["name"] for c in selection["adapters"]}
        model = merged_bundles(model, bundles, {c["name"]: c["weight"] for c in selection["adapters"]})
        steering = selection.get("steering")
        if steering:
            all_vectors = read_bundle(ROOT / "adapters" / steering["adapter"]).vectors
            vectors = {layer: all_vectors[layer] for layer in steering["layers"]}
    out = []
    with steered_by_hand(model, vectors, selection["steering"]["coeff"] if vectors else 0.0):
        for context, continuation in requests:
            ctx, cont = encode_pair(base.tokenizer, context, continuation)
            out.append(sum(token_logprobs(model, ctx + cont)[len(ctx) - 1:]))
    return out


def received(runs: dict[str, Path], name: str) -> tuple[list[tuple[str, str]], list[float], list[int]]:
    """(requests, the log-likelihoods lm_eval got for them, the choice it scored as right per document)."""
    requests, lls, picks = [], [], []
    for sample in samples(runs[name], "hh_harmless_pref"):
        doc_lls = [float(resp[0][0]) for resp in sample["resps"]]
        requests += [(a["arg_0"], a["arg_1"]) for a in sample["arguments"].values()]
        lls += doc_lls
        picks.append(int(sample["acc"]))
    return requests, lls, picks


@pytest.mark.parametrize("name, selection", [("gentle", PRESET), (DUAL, {"adapters": [{"name": DUAL, "weight": 1}]}),
                                             ("base", None)])
def test_harness_log_likelihoods_equal_the_in_process_ones(harness, plain, name, selection):
    requests, lls, picks = received(harness, name)
    assert len(requests) == 2 * LIMIT
    want = in_process(plain, selection, requests)
    assert lls == pytest.approx(want, abs=1e-4)
    # Its accuracy follows from those numbers: the chosen answer (choice 0) scored higher.
    assert picks == [int(want[2 * i] > want[2 * i + 1]) for i in range(LIMIT)]
    assert results(harness[name])["hh_harmless_pref"]["acc,none"] == pytest.approx(sum(picks) / LIMIT)


def test_the_preset_and_the_adapter_are_really_applied(harness):
    base, dual, gentle = (received(harness, n)[1] for n in ("base", DUAL, "gentle"))
    assert min(abs(a - b) for a, b in zip(base, dual, strict=True)) > 1e-3
    assert min(abs(a - b) for a, b in zip(dual, gentle, strict=True)) > 1e-3


def test_generate_until_through_chat_completions(harness, served):
    docs = samples(harness["chat"], "hh_harmless_gen")
    assert len(docs) == 2
    for doc in docs:
        [answer] = doc["resps"][0]
        # The same request straight to the API: greedy, so the harness must have received exactly this.
        [history] = doc["arguments"]["gen_args_0"]["arg_0"]  # the chat messages, as the JSON it sent
        messages = json.loads(history)
        assert messages[-1] == {"role": "user", "content": doc["doc"]["question"]}
        direct = httpx.post(served + "/v1/chat/completions", timeout=120, json={
            "model": "gentle", "messages": messages, "max_tokens": 16, "temperature": 0, "stop": ["\n"]})
        assert direct.status_code == 200, direct.text
        assert answer == direct.json()["choices"][0]["message"]["content"]
    assert "exact_match,none" in results(harness["chat"])["hh_harmless_gen"]
