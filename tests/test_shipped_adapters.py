"""The adapters shipped in adapters/: small, plain PEFT, and their recorded metrics reproducible."""

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rahf_serve.bundle import read_bundle
from rahf_serve.models import load_base
from training.config import load_config
from training.data import load_preferences
from training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "adapters").iterdir() if (p / "rahf.json").is_file())
DATA = Path(__file__).parent / "data" / "ultrafeedback_demo_300.sharegpt.json"


def test_both_rahf_variants_are_shipped():
    assert {read_bundle(p).manifest["method"] for p in SHIPPED} == {"scit", "dual"}


@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=lambda p: p.name)
def test_bundle_is_small_and_documented(bundle_dir):
    size = sum(f.stat().st_size for f in bundle_dir.iterdir())
    assert size < 4 * 2**20, f"{bundle_dir.name}: {size} bytes"
    manifest = read_bundle(bundle_dir).manifest
    card = (bundle_dir / "README.md").read_text()
    assert manifest["data"]["rows"] == "0:240"
    assert manifest["command"].startswith("rahf-train run") and manifest["command"] in card
    assert f"{manifest['metrics']['preference_accuracy_aligned']:.3f}" in card


@pytest.mark.slow
@pytest.mark.parametrize("bundle_dir", SHIPPED, ids=lambda p: p.name)
def test_plain_peft_loads_it_and_recorded_metrics_reproduce(bundle_dir, real_model_dir):
    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    ids = torch.tensor([base.tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
        after = PeftModel.from_pretrained(base.model, str(bundle_dir)).eval()(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3

    manifest = read_bundle(bundle_dir).manifest
    recorded = manifest["metrics"]
    result = evaluate(load_base("smollm2-135m-instruct", device="cpu", dtype="float32"), str(bundle_dir),
                      load_preferences(str(DATA), recorded["eval_rows"]), _eval_config(manifest["method"]))
    assert result["pairs"] == recorded["eval_pairs"]
    assert result["base"]["accuracy"] == pytest.approx(recorded["preference_accuracy_base"], abs=1e-4)
    assert result["aligned"]["accuracy"] == pytest.approx(recorded["preference_accuracy_aligned"], abs=1e-4)
    assert result["base"]["margin"] == pytest.approx(recorded["mean_margin_base"], abs=1e-3)
    assert result["aligned"]["margin"] == pytest.approx(recorded["mean_margin_aligned"], abs=1e-3)


def _eval_config(method: str):
    cfg = load_config(f"smollm2-{method}")
    cfg.eval.generations = 0  # scores only: generation is not part of the recorded metrics
    return cfg
