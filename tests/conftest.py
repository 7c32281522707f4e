"""Fixtures: a tiny random llama with the real SmolLM2 tokenizer, and the real default model.

The tiny model (4 layers, hidden 64) makes the fast suite need no weights. Tests that use the
real embedded default are marked `slow`; they still run in CI.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rahf_serve.models import BaseModel, embedded_tokenizer, load_base, materialize_embedded

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)


def build_tiny_model_dir(path: Path, tokenizer, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **{**TINY, **overrides})
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return embedded_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


@pytest.fixture
def tiny_base(tiny_model_dir) -> BaseModel:
    """A fresh load per test: PEFT wraps models in place, so tests must not share one."""
    return load_base(str(tiny_model_dir), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def real_model_dir() -> Path:
    return materialize_embedded()


@pytest.fixture
def real_base(real_model_dir) -> BaseModel:
    return load_base("smollm2-135m-instruct", device="cpu", dtype="float32")


def pytest_collection_modifyitems(config, items):
    # `gpu` tests need CUDA; on CPU-only machines (developers here, CI) they skip rather than fail.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA: torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
