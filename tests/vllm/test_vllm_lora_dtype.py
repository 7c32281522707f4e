"""`--lora-dtype` with `--engine vllm`: vLLM gets it as its `lora_dtype`, and rounds the factors as the built-in
engine does with the same flag (both keep bfloat16 factors of a float32 model)."""

from __future__ import annotations

import re

import pytest
import torch

from tests.vllm.conftest import builtin, launched
from tests.vllm.test_vllm_engine import CASES, chat

pytestmark = [pytest.mark.slow, pytest.mark.vllm]


def test_bfloat16_factors_give_vllm_the_built_in_engine_s_greedy_text(adapter_dir, tmp_path, real_model_dir):
    with builtin(adapter_dir, lora_dtype=torch.bfloat16) as ours:
        client = ours.client()
        reference = {case: chat(client, model, extra) for case, (model, extra) in CASES.items()}
    with launched(adapter_dir, tmp_path / "rahf-serve.log", "--lora-dtype", "bfloat16") as served:
        client = served.client()
        got = {case: chat(client, model, extra) for case, (model, extra) in CASES.items()}
        started = re.search(r"starting vLLM: .*'lora_dtype': ([\w.]+)", served.log.read_text())
    assert started is not None and started.group(1) == "torch.bfloat16"
    assert got == reference
    assert len(set(got.values())) == len(got), got  # the adapters, blend and steering each change the text
