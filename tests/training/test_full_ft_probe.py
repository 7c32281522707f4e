"""benchmarks/full_ft_probe.py: a fine-tune of every weight, written as a LoRA that equals it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from rahf_serve.errors import LimitExceeded
from rahf_serve.models import load_base
from training.evaluate import Models

from .conftest import DATA

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import full_ft_probe  # noqa: E402


def weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    return {p: m.weight.detach().clone() for p, m in full_ft_probe.targets_of(model, names).items()}


def test_snapshots_are_loras_equal_to_the_fine_tuned_weights(tiny_model_dir, tmp_path, monkeypatch):
    before = weights(load_base(str(tiny_model_dir), device="cpu", dtype="float32").model, ["q_proj", "v_proj"])
    out = tmp_path / "probe"
    # Keep the weights the script trained as each snapshot saw them: the last snapshot must reproduce them.
    trained: list[torch.Tensor] = []
    real_change = full_ft_probe.lora_of_change

    def change(start, now):
        trained.append(now.clone())
        return real_change(start, now)

    monkeypatch.setattr(full_ft_probe, "lora_of_change", change)
    monkeypatch.setattr(sys, "argv", ["full_ft_probe.py", "--out", str(out), "--config", "tiny", "--data", str(DATA),
                                      "--rows", "0:8", "--base", str(tiny_model_dir), "--lr", "1e-2", "--steps", "2",
                                      "--snapshot-every", "1"])
    full_ft_probe.main()
    assert sorted(p.name for p in out.glob("good@*")) == ["good@1", "good@2"]
    last = dict(zip(before, trained[-len(before):], strict=True))  # modules in the same order each snapshot

    base = load_base(str(tiny_model_dir), device="cpu", dtype="float32").model
    merged = PeftModel.from_pretrained(base, out / "good@2").merge_and_unload()
    after = weights(merged, ["q_proj", "v_proj"])
    assert set(after) == set(before)
    for path, w in after.items():
        assert not torch.allclose(w, before[path], atol=1e-4)  # it trained
        torch.testing.assert_close(w, last[path], atol=1e-5, rtol=1e-4)

    # The scorers read it like any adapter folder; the reader's rank limit is theirs to set (full rank
    # on SmolLM2 is 576, above the serving limit).
    rank = json.loads((out / "good@2" / "adapter_config.json").read_text())["r"]
    tiny = load_base(str(tiny_model_dir), device="cpu", dtype="float32")
    with pytest.raises(LimitExceeded, match=f"rank {rank} is above the limit of {rank - 1}"):
        Models(tiny, {"full": str(out / "good@2")}, max_rank=rank - 1)
    assert Models(tiny, {"full": str(out / "good@2")}, max_rank=rank).names == ["base", "full"]
