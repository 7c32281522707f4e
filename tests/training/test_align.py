import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from rahf_serve.bundle import read_bundle
from rahf_serve.models import load_base
from training.cli import main
from training.encode import Encoded, collate
from training.forward import block_outputs

from .conftest import fork_run, tiny_config


def test_block_outputs_equal_output_hidden_states(tiny_base):
    examples = [Encoded(tuple(range(100, 120)), 5), Encoded(tuple(range(200, 230)), 7)]
    batch = collate(examples, tiny_base.tokenizer.pad_token_id)
    with torch.no_grad():
        full = tiny_base.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               output_hidden_states=True).hidden_states
    early = block_outputs(tiny_base.model, examples, tiny_base.tokenizer.pad_token_id, [1, 3])
    assert sorted(early) == [1, 3]
    for layer in (1, 3):
        assert torch.equal(full[layer], early[layer])
    # the last layer: the block's own output, not transformers' final-normed entry
    last = block_outputs(tiny_base.model, examples, tiny_base.tokenizer.pad_token_id, [4])[4]
    assert not torch.allclose(last, full[4])
    torch.testing.assert_close(tiny_base.model.model.norm(last), full[4])


def test_phase3_loss_falls(scit_run, tmp_path):
    # Full-batch steps: every step sees the same 8 examples, so the curve is the objective's.
    cfg = tiny_config(tmp_path / "c.yaml", {"align": {"steps": 15, "batch_size": 8, "micro_batch_size": 8,
                                                      "lr": 0.01, "checkpoint_every": 0}})
    run = fork_run(scit_run, tmp_path / "run")
    assert main(["align", "--out", str(run), "--config", str(cfg)]) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if r.get("phase") == "align" and "loss" in r]
    assert len(losses) == 15
    assert losses[-1] < 0.6 * losses[0], losses
    assert sum(losses[-4:]) < sum(losses[:4])


def test_bundle_is_a_plain_peft_lora(scit_run, tiny_model_dir):
    bundle = read_bundle(scit_run / "bundle")
    manifest = bundle.manifest
    assert manifest["method"] == "scit" and manifest["alpha"] == 5.0
    assert manifest["data"]["pairs"] == 8 and manifest["data"]["rows"] == "0:8"
    assert "SCIT model + phase 3" in manifest["composition"]
    assert sorted(bundle.vectors) == [1, 2, 3, 4]   # every hidden_states index 1..num_layers
    assert manifest["metrics"]["eval_pairs"] == 4   # held-out scores recorded by the run
    # Phase 3 only where it can move a target: blocks 0..max(target)-1 (phase 1 is on every block).
    assert manifest["lora"]["parts"]["phase3"]["layers_to_transform"] == list(range(max(manifest["layers"])))
    assert {m.rsplit(".", 1)[1] for m in bundle.lora_shapes} == {"q_proj", "v_proj"}
    # Plain PEFT loads it onto a plain base, and it changes the model.
    base = load_base(str(tiny_model_dir), device="cpu")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base.model, str(scit_run / "bundle"))
        after = peft_model(input_ids=ids).logits
    assert not torch.allclose(before, after)
    weights = load_file(scit_run / "bundle" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in weights)


def test_phase3_aligns_any_subset_of_the_collected_layers(scit_run, tmp_path, capsys):
    # collect.layers keeps extra layers, so phase 3 can move to other layers without collecting again.
    cfg = tiny_config(tmp_path / "c.yaml", {"collect": {"layers": [1, 3, 4]}, "align": {"target_layers": [3]}})
    run = fork_run(scit_run, tmp_path / "run")
    assert main(["collect", "--out", str(run), "--config", str(cfg)]) == 0
    summary = json.loads((run / "collect" / "summary.json").read_text())
    diffs = load_file(run / "collect" / "diffs.safetensors")
    assert summary["layers"] == [1, 3, 4] and diffs["ex.0"].shape[0] == 3
    assert main(["align", "--out", str(run), "--config", str(cfg)]) == 0
    bundle = read_bundle(run / "bundle")
    assert bundle.manifest["layers"] == [3]
    assert bundle.manifest["lora"]["parts"]["phase3"]["layers_to_transform"] == [0, 1, 2]
    # a target layer phase 2 did not keep is refused up front, naming the fix
    capsys.readouterr()
    other = tiny_config(tmp_path / "d.yaml", {"collect": {"layers": [1, 3, 4]}, "align": {"target_layers": [2]}})
    assert main(["align", "--out", str(run), "--config", str(other)]) == 2
    assert "[2] were not collected" in capsys.readouterr().err
