"""The adapters shipped in adapters/: plain PEFT with phase 1 inside, documented, and their
recorded held-out numbers reproducible from the per-pair margins of the full evaluation."""

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rahf_serve.bundle import read_bundle
from rahf_serve.models import load_base
from training.config import TrainConfig
from training.data import load_preferences
from training.evaluate import Models, margins

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "adapters").iterdir() if (p / "rahf.json").is_file())
HEAD = Path(__file__).parent / "data" / "hh_harmless_test_head40.jsonl"
EVAL = ROOT / "docs" / "results" / "hh-test" / "eval.json"


def test_both_rahf_variants_are_shipped():
    assert {read_bundle(p).manifest["method"] for p in SHIPPED} == {"scit", "dual"}


@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=lambda p: p.name)
def test_bundle_holds_phase1_and_is_documented(bundle_dir):
    size = sum(f.stat().st_size for f in bundle_dir.iterdir())
    # float32 r16 on all seven Linear layers of 30 blocks is 19.5 MB; anything much larger is a mistake
    assert size < 24 * 2**20, f"{bundle_dir.name}: {size} bytes"
    manifest = read_bundle(bundle_dir).manifest
    parts = manifest["lora"]["parts"]
    assert parts["phase1"]["adapter"] == {"scit": "scit", "dual": "good"}[manifest["method"]]
    assert read_bundle(bundle_dir).rank == parts["phase1"]["r"] + parts["phase3"]["r"]
    card = (bundle_dir / "README.md").read_text()
    assert manifest["data"]["rows"] == "0:1207" and "hh_harmless/train.jsonl" in manifest["data"]["name"]
    assert manifest["command"].startswith("rahf-train run") and manifest["command"] in card
    metrics = manifest["metrics"]
    assert metrics["eval_pairs"] >= 990 and "hh_harmless/test.jsonl" in metrics["eval_data"]
    assert f"{metrics['preference_accuracy_aligned']:.3f}" in card and "McNemar" in card
    # the recorded numbers are the full evaluation's, whose per-pair margins are in the repo
    scores = json.loads(EVAL.read_text())["preference"]["scores"]
    assert scores[bundle_dir.name]["accuracy"] == metrics["preference_accuracy_aligned"]
    assert scores["base"]["accuracy"] == metrics["preference_accuracy_base"]


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=lambda p: p.name)
def test_plain_peft_loads_it_and_recorded_margins_reproduce(bundle_dir, real_model_dir):
    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    ids = torch.tensor([base.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
        after = PeftModel.from_pretrained(base.model, str(bundle_dir)).eval()(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3

    recorded = json.loads(EVAL.read_text())["preference"]["margins"]
    head = load_preferences(str(HEAD))
    models = Models(load_base("smollm2-135m-instruct", device="cpu", dtype="float32"), {"a": str(bundle_dir)})
    config = TrainConfig()   # the evaluation's cuts: eval defaults
    for name, key in (("base", "base"), ("a", bundle_dir.name)):
        with models.use(name):
            got = margins(models.model, models.tokenizer, head.pairs[:24], config, desc=None)
        torch.testing.assert_close(got, torch.tensor(recorded[key][:24]), atol=2e-4, rtol=0)
