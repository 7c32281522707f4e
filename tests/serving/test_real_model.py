"""The engine on the real embedded default (SmolLM2-135M), kept short."""

from __future__ import annotations

import pytest

from rahf_serve.api import create_app
from rahf_serve.engine import Engine
from rahf_serve.registry import AdapterRegistry
from rahf_serve.request import GenerationRequest
from rahf_serve.sampling import SamplingParams
from tests.helpers import random_lora_bundle
from tests.serving.conftest import LiveServer

pytestmark = pytest.mark.slow
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


def test_engine_matches_generate_and_serves_chat(real_base, tmp_path):
    tok = real_base.tokenizer
    text = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")
    ref = real_base.model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    expected = ref[0, ids["input_ids"].shape[1]:].tolist()

    random_lora_bundle(real_base, tmp_path / "kind", seed=1, r=8)
    engine = Engine(real_base, max_new_tokens=32)
    registry = AdapterRegistry(engine, tmp_path)
    registry.load_dir()
    with engine, LiveServer(create_app(engine, registry)) as live:
        got = engine.generate(GenerationRequest(ids["input_ids"][0].tolist(), SamplingParams(12, 0.0)))
        assert got.token_ids == expected[:len(got.token_ids)] and got.token_ids
        assert "Paris" in got.text

        from openai import OpenAI

        client = OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(model=real_base.name, messages=CHAT, max_tokens=12, temperature=0)
        assert answer.choices[0].message.content == got.text
        streamed = list(client.chat.completions.create(
            model="kind", messages=CHAT, max_tokens=4, stream=True,
            extra_body={"steering": {"adapter": "kind", "coeff": 1.0}}))
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")
