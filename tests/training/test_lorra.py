"""LoRRA, the paper's ablation without phase 1, and `rahf-train eval --record`."""

import json

import torch
from safetensors.torch import load_file

from rahf_serve.models import load_base
from training.cli import main
from training.config import load_config
from training.data import load_preferences
from training.encode import encode
from training.forward import block_outputs

from .conftest import DATA, tiny_config, train


def test_lorra_skips_phase1_and_collects_through_the_base(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_model_dir, out, method="lorra", rows="0:4")
    assert not [p for p in (out / "phase1").iterdir() if p.is_dir()], "LoRRA must train no phase-1 adapter"
    manifest = json.loads((out / "bundle" / "rahf.json").read_text())
    assert manifest["method"] == "lorra" and "no phase 1" in manifest["composition"]
    assert manifest["steps"]["phase1"] == 0
    # the collected differences are the plain base's, under p+ vs p-, on the drawn response
    cfg = load_config(out / "config.yaml")
    base = load_base(str(tiny_model_dir), device="cpu")
    tok, pair = base.tokenizer, load_preferences(str(DATA), "0:4").pairs[1]
    summary = json.loads((out / "collect" / "summary.json").read_text())
    layers, (index, side) = summary["layers"], summary["stimuli"][1]
    assert index == 1
    sides = [encode(tok, pair.chat(), getattr(pair, side), max_prompt=cfg.data.max_prompt_tokens,
                    max_response=cfg.collect.max_res_len, instruction=i)
             for i in (cfg.phase1.good_instruction, cfg.phase1.bad_instruction)]
    with torch.no_grad():
        h = [block_outputs(base.model, [s], tok.pad_token_id, layers) for s in sides]
    want = torch.stack([h[0][layer][0, sides[0].response_start:] - h[1][layer][0, sides[1].response_start:]
                        for layer in layers])
    got = load_file(out / "collect" / "diffs.safetensors")["ex.1"]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got.abs().max() > 0


def test_eval_record_writes_scores_into_the_bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_model_dir, out, rows="0:4", config=tiny_config(tmp_path / "c.yaml", {"align": {"steps": 2}}))
    assert json.loads((out / "bundle" / "rahf.json").read_text()).get("metrics") in (None, {})
    assert main(["eval", "--adapter", str(out / "bundle"), "--base", str(tiny_model_dir), "--data", str(DATA),
                 "--rows", "240:243", "--config", "tiny", "--record"]) == 0
    metrics = json.loads((out / "bundle" / "rahf.json").read_text())["metrics"]
    assert metrics["eval_rows"] == "240:243" and metrics["eval_pairs"] == 3
    assert 0.0 <= metrics["preference_accuracy_aligned"] <= 1.0
