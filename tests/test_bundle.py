import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file

from rahf_serve.bundle import (
    MANIFEST_FILE,
    VECTORS_FILE,
    WEIGHTS_FILE,
    attach,
    read_bundle,
    write_bundle,
)
from rahf_serve.errors import (
    BundleNotFound,
    CorruptBundleError,
    FingerprintMismatch,
    LimitExceeded,
    NoMatchingModules,
    UnsafeFileError,
)
from tests.conftest import build_tiny_model_dir
from tests.helpers import random_lora_bundle


def _logits(model, tokenizer):
    ids = tokenizer("Tell me about preferences.", return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def test_bundle_loads_with_plain_peft_and_changes_logits(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["README.md", "adapter_config.json", WEIGHTS_FILE, VECTORS_FILE, MANIFEST_FILE])
    before = _logits(tiny_base.model, tiny_base.tokenizer)
    peft_model = PeftModel.from_pretrained(tiny_base.model, str(path))
    after = _logits(peft_model, tiny_base.tokenizer)
    assert (after - before).abs().max() > 1e-3
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "base_model:" in card


def test_read_bundle_roundtrips_vectors_and_manifest(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    bundle = read_bundle(path)
    assert bundle.has_steering and sorted(bundle.vectors) == [1, 2]
    assert bundle.manifest["base"]["fingerprint"] == tiny_base.fingerprint
    assert bundle.rank == 4 and bundle.lora_shapes["model.layers.0.self_attn.q_proj"]["A"] == (4, 64)


def test_attach_two_adapters_share_one_model(tiny_base, tmp_path):
    a = read_bundle(random_lora_bundle(tiny_base, tmp_path / "a", seed=1))
    b = read_bundle(random_lora_bundle(tiny_base, tmp_path / "b", seed=2))
    model = attach(tiny_base.model, a, "a", tiny_base.fingerprint)
    assert attach(model, b, "b", tiny_base.fingerprint) is model
    assert set(model.peft_config) == {"a", "b"}


def test_plain_peft_lora_without_rahf_files_reads(tiny_base, tmp_path):
    bundle = read_bundle(random_lora_bundle(tiny_base, tmp_path / "plain", with_vectors=False))
    assert bundle.manifest is None and not bundle.has_steering


def test_write_is_atomic_and_replaces(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b", seed=1)
    first = (path / WEIGHTS_FILE).read_bytes()
    random_lora_bundle(tiny_base, tmp_path / "b", seed=2)
    assert (path / WEIGHTS_FILE).read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temp or old folder left behind


def test_failed_write_leaves_previous_bundle(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(AttributeError):  # object() is no tensor: the write fails half-way
        write_bundle(path, adapter_config={"r": 1}, lora_state={"base_model.model.x.lora_A.weight": object()},
                     vectors=None, manifest=None)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


# --- each refusal: its exception type and a message that names the problem


def test_missing_dir(tmp_path):
    with pytest.raises(BundleNotFound, match="does not exist"):
        read_bundle(tmp_path / "nope")


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.pt", "x.pkl"])
def test_pickle_files_are_refused(tiny_base, tmp_path, name):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    (path / name).write_bytes(b"\x80\x04evil")
    with pytest.raises(UnsafeFileError, match="pickle"):
        read_bundle(path)


@pytest.mark.parametrize("missing, message", [(WEIGHTS_FILE, "adapter_model.safetensors is missing"),
                                              ("adapter_config.json", "adapter_config.json is missing"),
                                              (VECTORS_FILE, "rahf_vectors.safetensors is missing"),
                                              (MANIFEST_FILE, "rahf.json is missing")])
def test_missing_files(tiny_base, tmp_path, missing, message):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    (path / missing).unlink()
    with pytest.raises(CorruptBundleError, match=message):
        read_bundle(path)


def test_corrupt_safetensors_header(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    (path / WEIGHTS_FILE).write_bytes(b"\xff" * 8 + b"{not json")
    with pytest.raises(CorruptBundleError, match="not a valid safetensors file"):
        read_bundle(path)


def test_corrupt_config_json(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    (path / "adapter_config.json").write_text("{")
    with pytest.raises(CorruptBundleError, match="not valid JSON"):
        read_bundle(path)


def test_rank_limit(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b", r=8)
    with pytest.raises(LimitExceeded, match="rank 8 is above the limit of 4"):
        read_bundle(path, max_rank=4)


def test_size_limit(tiny_base, tmp_path):
    with pytest.raises(LimitExceeded, match="above the limit"):
        read_bundle(random_lora_bundle(tiny_base, tmp_path / "b"), max_bytes=1000)


def test_fingerprint_mismatch_names_both_bases(tiny_base, tmp_path, tokenizer):
    other = read_bundle(random_lora_bundle(tiny_base, tmp_path / "b"))
    wider_dir = build_tiny_model_dir(tmp_path / "wide", tokenizer, hidden_size=96)
    from rahf_serve.models import load_base

    wide = load_base(str(wider_dir))
    with pytest.raises(FingerprintMismatch, match=r"trained on .*hidden_size=64.* loaded base is .*hidden_size=96"):
        attach(wide.model, other, "x", wide.fingerprint, base_name="wide")


def test_plain_lora_for_another_shape_is_refused(tiny_base, tmp_path, tokenizer):
    bundle = read_bundle(random_lora_bundle(tiny_base, tmp_path / "b", with_vectors=False))
    from rahf_serve.models import load_base

    wide = load_base(str(build_tiny_model_dir(tmp_path / "wide", tokenizer, hidden_size=96)))
    with pytest.raises(FingerprintMismatch, match=r"do not fit .*Linear\(96"):
        attach(wide.model, bundle, "x", wide.fingerprint)


def test_adapter_matching_no_module(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    state_path = path / WEIGHTS_FILE
    from safetensors.torch import load_file

    renamed = {k.replace("self_attn.q_proj", "attn.c_attn").replace("self_attn.v_proj", "attn.c_proj"): v
               for k, v in load_file(state_path).items()}
    save_file(renamed, state_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = ["c_attn", "c_proj"]
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(NoMatchingModules, match="matches no module"):
        attach(tiny_base.model, read_bundle(path), "x", tiny_base.fingerprint)


def test_unexpected_tensor_is_refused(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    save_file({"lm_head.weight": torch.zeros(2, 2)}, path / WEIGHTS_FILE)
    with pytest.raises(CorruptBundleError, match="only LoRA A/B weights"):
        read_bundle(path)


def test_copy_of_bundle_dir_is_still_valid(tiny_base, tmp_path):
    path = random_lora_bundle(tiny_base, tmp_path / "b")
    shutil.copytree(path, tmp_path / "c")
    assert read_bundle(tmp_path / "c").vectors.keys() == read_bundle(path).vectors.keys()
