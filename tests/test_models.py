import time

import pytest
import torch

from rahf_serve.errors import BaseModelError
from rahf_serve.models import load_base, resolve_device, resolve_dtype


def test_tiny_base_loads_on_cpu_float32(tiny_base):
    assert tiny_base.device.type == "cpu" and tiny_base.dtype == torch.float32
    assert tiny_base.tokenizer.padding_side == "left" and tiny_base.tokenizer.pad_token is not None
    assert tiny_base.fingerprint == {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4,
                                     "vocab_size": len(tiny_base.tokenizer)}
    assert not any(p.requires_grad for p in tiny_base.model.parameters())


def test_dtype_override(tiny_model_dir):
    assert load_base(str(tiny_model_dir), dtype="bfloat16").model.dtype == torch.bfloat16


def test_auto_device_and_dtype():
    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(BaseModelError, match="unknown dtype"):
        resolve_dtype("int3", dev)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(BaseModelError, match="no GPU"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec, message", [("not/a/dir/nor/id", "not the alias"),
                                           ("./tests", "not a model directory")])
def test_bad_base_specs(spec, message):
    with pytest.raises(BaseModelError, match=message):
        load_base(spec)


def test_pickle_only_model_dir_is_refused(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(BaseModelError, match="pickle"):
        load_base(str(tmp_path))


@pytest.mark.slow
def test_embedded_default_matches_gguf_and_loads_fast(real_model_dir):
    from transformers import AutoModelForCausalLM

    from rahf_serve.models import embedded_gguf_path

    start = time.perf_counter()
    base = load_base("smollm2-135m-instruct", device="cpu")
    load_s = time.perf_counter() - start
    assert base.fingerprint == {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30,
                                "vocab_size": 49152}
    assert "Q4_1" in base.source_note and base.hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    gguf = embedded_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = base.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (base.model(ids).logits - reference(ids).logits).abs().max().item()
    print(f"cached load {load_s:.2f}s; max |logits(cache) - logits(gguf)| = {diff:.3g}")
    assert diff < 1e-4
