"""The shipped model is phase-1 model + phase-3 LoRA, as ONE plain PEFT LoRA over the plain base.

Reference computation: merge the phase-1 LoRA into the base weights, put the phase-3 LoRA on top
(the model phase 3 trains), and compare its logits with plain PEFT loading the composed LoRA onto
an untouched base.
"""

import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from rahf_serve.bundle import peft_payload, read_bundle, write_bundle
from rahf_serve.models import load_base
from training.align import compose


def randomise(model, adapter, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{adapter}." in name and "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def test_composed_lora_equals_phase3_on_the_merged_phase1_model(tiny_model_dir, tmp_path):
    # phase 1: q/k/v/o on every block, rank 4, alpha 8 (scaling 2)
    base = load_base(str(tiny_model_dir), device="cpu")
    p1 = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                   "o_proj"]))
    randomise(p1, "default", 1)
    p1.save_pretrained(tmp_path / "phase1")
    # phase 3: q/v on blocks 0..1 only, rank 2, alpha 6 (scaling 3), on the phase-1-merged model
    merged = PeftModel.from_pretrained(load_base(str(tiny_model_dir), device="cpu").model,
                                       str(tmp_path / "phase1")).merge_and_unload()
    p3 = get_peft_model(merged, LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj"],
                                           layers_to_transform=[0, 1]))
    randomise(p3, "default", 2)
    ids = torch.tensor([[5, 17, 300, 42, 7, 9, 1000, 3]])
    with torch.no_grad():
        want = p3(input_ids=ids).logits
    config, state = peft_payload(p3)

    shipped_config, shipped_state = compose(load_base(str(tiny_model_dir), device="cpu").model,
                                            tmp_path / "phase1", config, state)
    assert shipped_config["r"] == 6 and shipped_config["lora_alpha"] == 6   # ranks concatenated, scaling 1
    assert set(shipped_config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    write_bundle(tmp_path / "shipped", adapter_config=shipped_config, lora_state=shipped_state, vectors=None,
                 manifest=None)
    plain = load_base(str(tiny_model_dir), device="cpu")
    with torch.no_grad():
        got = PeftModel.from_pretrained(plain.model, str(tmp_path / "shipped"))(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # zero rows where phase 3 does not reach: k_proj everywhere, q_proj above block 1
    a = shipped_state["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"]
    assert a[4:].abs().max() == 0 and a[:4].abs().max() > 0
    assert json.loads((tmp_path / "shipped" / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_a_run_ships_its_phase1_inside_one_lora(scit_run, tiny_model_dir):
    bundle = read_bundle(scit_run / "bundle")
    parts = bundle.manifest["lora"]["parts"]
    assert parts["phase1"]["adapter"] == "scit" and parts["phase1"]["layers_to_transform"] is None
    assert parts["phase3"]["layers_to_transform"] == list(range(max(bundle.manifest["layers"])))
    assert bundle.rank == parts["phase1"]["r"] + parts["phase3"]["r"]
    blocks = {int(m.split(".layers.")[1].split(".")[0]) for m in bundle.lora_shapes}
    assert blocks == set(range(4))   # phase 1 reaches every block of the tiny model
