"""The CUDA path: bfloat16 by default, adapters and merged exports on the GPU.

Marked `gpu`: conftest skips them where torch sees no CUDA device. `scripts/gpu_check.sh` runs them.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from rahf_serve.bundle import attach, read_bundle
from rahf_serve.models import load_base
from tests.helpers import random_lora_bundle
from training.export import export_merged

pytestmark = pytest.mark.gpu


def _ids(vocab: int, device: torch.device | str) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 10), generator=torch.Generator().manual_seed(0)).to(device)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_auto_picks_cuda_and_bfloat16(tiny_model_dir):
    base = load_base(str(tiny_model_dir))
    assert base.device.type == "cuda" and base.dtype == torch.bfloat16
    params = list(base.model.parameters())
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)


def test_bundle_attaches_and_generates_on_cuda(tiny_base, tiny_model_dir, tmp_path):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "aligned")
    cpu_reference = _logits(PeftModel.from_pretrained(tiny_base.model, str(bundle_dir)).eval(),
                            _ids(tiny_base.model.config.vocab_size, "cpu"))
    base = load_base(str(tiny_model_dir))
    model = attach(base.model, read_bundle(bundle_dir), "aligned", base.fingerprint)
    ids = _ids(base.model.config.vocab_size, base.device)
    got = _logits(model, ids)
    assert torch.isfinite(got).all()
    # bfloat16 keeps ~3 significant digits: compare directions, not values.
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), cpu_reference.flatten(), dim=0)
    assert cosine > 0.99
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                         pad_token_id=base.tokenizer.pad_token_id)
    assert out.shape == (2, ids.shape[1] + 8) and out.is_cuda


def test_merged_export_runs_on_cuda(tiny_base, tiny_model_dir, tmp_path):
    bundle_dir = random_lora_bundle(tiny_base, tmp_path / "aligned")
    ids = _ids(tiny_base.model.config.vocab_size, "cpu")
    expected = _logits(PeftModel.from_pretrained(tiny_base.model, str(bundle_dir)).eval(), ids)
    out = export_merged(str(bundle_dir), tmp_path / "merged", base=str(tiny_model_dir))
    merged = load_base(str(out), device="cuda", dtype="float32")
    # float32 on both sides; the GPU's matmul order differs from the CPU's, hence not bit-exact.
    torch.testing.assert_close(_logits(merged.model, ids.to(merged.device)), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_embedded_default_chats_on_cuda(real_model_dir):
    base = load_base("smollm2-135m-instruct")
    assert base.device.type == "cuda" and base.dtype == torch.bfloat16
    prompt = base.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = {k: v.to(base.device) for k, v in prompt.items()}
    with torch.no_grad():
        out = base.model.generate(**prompt, max_new_tokens=16, do_sample=False,
                                  pad_token_id=base.tokenizer.pad_token_id)
    text = base.tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
