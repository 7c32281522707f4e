"""Exports: the merged model equals base + adapter; the control-vector GGUF is what llama.cpp reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from peft import PeftModel
from safetensors.torch import load_file

from rahf_serve.bundle import VECTORS_FILE, read_bundle, write_bundle
from rahf_serve.errors import BundleError
from rahf_serve.models import load_base
from rahf_serve.steering import add_steering
from tests.helpers import random_lora_bundle
from training.cli import main as rahf_train
from training.export import EXPORT_NOTE, export_control_vector, export_merged, gguf_direction_index

# Merging adds B@A*scale into W once instead of per forward: float32 reordering only.
MERGE_ATOL = 1e-4


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _field(reader: GGUFReader, key: str):
    return reader.get_field(key).contents()


def test_merged_export_logits_equal_base_plus_adapter(tiny_base, tiny_model_dir, tmp_path):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "aligned")
    ids = torch.randint(0, tiny_base.model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = _logits(tiny_base.model, ids)
    reference = PeftModel.from_pretrained(tiny_base.model, str(bundle_dir)).eval()
    expected = _logits(reference, ids)

    out = export_merged(str(bundle_dir), tmp_path / "merged", base=str(tiny_model_dir))

    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "tokenizer.json").is_file()
    assert not list(out.glob("adapter_*")), "a merged model carries no adapter files"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".merged")], "temp dir left behind"
    merged = load_base(str(out), device="cpu", dtype="float32")
    assert not any("lora" in k for k in merged.model.state_dict())
    got = _logits(merged.model, ids)
    assert (expected - base_logits).abs().max() > 1e-2, "the adapter must change logits for this test to mean anything"
    torch.testing.assert_close(got, expected, atol=MERGE_ATOL, rtol=0)
    note = json.loads((out / EXPORT_NOTE).read_text())
    assert note["bundle"] == "aligned" and note["lora"]["r"] == 4


def test_merged_export_replaces_an_old_export(tiny_base, tiny_model_dir, tmp_path):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "aligned")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "stale.txt").write_text("from an older export")
    export_merged(str(bundle_dir), out, base=str(tiny_model_dir))
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned", "merged"]


def _bundle_with_vectors(tiny_base, tmp_path, vectors: dict[int, torch.Tensor]):
    """A bundle whose LoRA comes from random_lora_bundle and whose vectors are ours."""
    src = read_bundle(random_lora_bundle(tiny_base, tmp_path / "src"))
    lora = load_file(str(src.path / "adapter_model.safetensors"))
    manifest = {**src.manifest, "layers": sorted(vectors)}
    return write_bundle(tmp_path / "cv-bundle", adapter_config=src.adapter_config, lora_state=lora,
                        vectors=vectors, manifest=manifest)


def test_control_vector_gguf_reads_back(tiny_base, tmp_path):
    n_layers, hidden = tiny_base.model.config.num_hidden_layers, tiny_base.model.config.hidden_size
    torch.manual_seed(1)
    vectors = {layer: torch.randn(hidden) for layer in range(1, n_layers + 1)}
    bundle_dir = _bundle_with_vectors(tiny_base, tmp_path, vectors)

    result = export_control_vector(str(bundle_dir), tmp_path / "cv.gguf", coeff=0.5)

    assert result.skipped == [1], "block 0's output has no llama.cpp control vector"
    assert result.directions == {layer: layer - 1 for layer in range(2, n_layers + 1)}
    reader = GGUFReader(tmp_path / "cv.gguf")
    assert _field(reader, "general.architecture") == "controlvector"
    assert _field(reader, "controlvector.model_hint") == "llama"
    assert _field(reader, "controlvector.layer_count") == n_layers - 1
    assert _field(reader, "rahf.coeff") == pytest.approx(0.5)
    assert _field(reader, "rahf.source_layers") == list(range(2, n_layers + 1))
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == sorted(f"direction.{n}" for n in range(1, n_layers))
    for layer in range(2, n_layers + 1):
        tensor = tensors[f"direction.{gguf_direction_index(layer)}"]
        assert tensor.tensor_type.name == "F32" and list(tensor.shape) == [hidden]
        np.testing.assert_array_equal(np.asarray(tensor.data), (vectors[layer] * 0.5).numpy())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cv.gguf")] == []


def test_control_vector_steers_like_rahf_serve(tiny_base, tmp_path):
    """llama.cpp adds direction.{n} to block n's output (build_cvec at the end of block n): replay
    that with hooks and compare with rahf-serve's own steering of the same layers at coeff 2."""
    hidden = tiny_base.model.config.hidden_size
    torch.manual_seed(2)
    vectors = {layer: torch.randn(hidden) for layer in (2, 3)}
    bundle_dir = _bundle_with_vectors(tiny_base, tmp_path, vectors)
    export_control_vector(str(bundle_dir), tmp_path / "cv.gguf", coeff=2.0)
    reader = GGUFReader(tmp_path / "cv.gguf")
    blocks = tiny_base.model.model.layers
    ids = torch.randint(0, tiny_base.model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    base = _logits(tiny_base.model, ids)

    def add(direction: torch.Tensor):
        return lambda module, args, output: output + direction

    hooks = [blocks[int(t.name.split(".")[1])].register_forward_hook(add(torch.from_numpy(np.array(t.data))))
             for t in reader.tensors]
    llama_cpp_way = _logits(tiny_base.model, ids)
    for hook in hooks:
        hook.remove()
    with add_steering(tiny_base.model, {layer: 2.0 * v[None, :] for layer, v in vectors.items()}):
        ours = _logits(tiny_base.model, ids)

    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(llama_cpp_way, ours, atol=1e-5, rtol=0)


def test_control_vector_refuses_a_bundle_without_vectors(tiny_base, tmp_path):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "plain", with_vectors=False)
    assert not (bundle_dir / VECTORS_FILE).exists()
    with pytest.raises(BundleError, match="no mean difference vectors"):
        export_control_vector(str(bundle_dir), tmp_path / "cv.gguf")
    assert not (tmp_path / "cv.gguf").exists()


def test_control_vector_refuses_only_block_zero(tiny_base, tmp_path):
    bundle_dir = _bundle_with_vectors(tiny_base, tmp_path, {1: torch.ones(tiny_base.model.config.hidden_size)})
    with pytest.raises(BundleError, match="cannot steer"):
        export_control_vector(str(bundle_dir), tmp_path / "cv.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cv-bundle", "src"]


def test_cli_export_both_kinds(tiny_base, tiny_model_dir, tmp_path, capsys):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "aligned")
    assert rahf_train(["export", str(bundle_dir), "--gguf-control-vector", str(tmp_path / "cv.gguf"),
                       "--coeff", "3"]) == 0
    assert "2->direction.1" in capsys.readouterr().out
    (tensor,) = GGUFReader(tmp_path / "cv.gguf").tensors
    np.testing.assert_allclose(np.asarray(tensor.data), read_bundle(bundle_dir).vectors[2].numpy() * 3, rtol=1e-6)
    assert rahf_train(["export", str(bundle_dir), "--merged", str(tmp_path / "m"), "--base", str(tiny_model_dir)]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_cli_export_needs_exactly_one_target(tmp_path):
    with pytest.raises(SystemExit):
        rahf_train(["export", str(tmp_path)])
    with pytest.raises(SystemExit):
        rahf_train(["export", str(tmp_path), "--merged", "a", "--gguf-control-vector", "b"])
    assert rahf_train(["export", str(tmp_path / "missing"), "--merged", str(tmp_path / "m")]) == 2
