"""The vLLM backend's own parts, without vLLM: blend folders, refusals, steering deltas and hooks.

They import no vLLM (the package imports it only when an engine starts), so they run in the fast suite of
the main environment; `test_vllm_engine.py` runs the whole thing on vLLM.
"""

from __future__ import annotations

import copy
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel

from rahf_serve.bundle import CONFIG_FILE, read_bundle
from rahf_serve.errors import LimitExceeded, RahfError
from rahf_serve.lora_slots import read_lora
from rahf_serve.models import load_base_skeleton
from rahf_serve.request import GenerationRequest, SteeringSpec
from rahf_serve.vllm_engine import UnsupportedByEngine, VllmEngine, VllmOptions
from rahf_serve.vllm_engine.blends import blend_digest, bundle_digest, write_blend
from rahf_serve.vllm_engine.convert import cache_salt, prompt_logprobs, steering_args, token_logprob
from rahf_serve.vllm_engine.steering import STEERING_KEY, _adder, _BatchSteering
from tests.helpers import merged_bundles, random_lora_bundle


@pytest.fixture
def bundles(tiny_base, tmp_path):
    kind = random_lora_bundle(tiny_base, tmp_path / "kind", seed=1)
    terse = random_lora_bundle(tiny_base, tmp_path / "terse", seed=2, r=2, targets=("q_proj", "v_proj", "o_proj"))
    return {"kind": kind, "terse": terse}


@pytest.mark.parametrize("weights", [{"kind": 0.7, "terse": -0.4}, {"kind": -1.5}])
def test_a_blend_folder_is_a_plain_peft_lora_of_the_exact_sum(tiny_base, tokenizer, bundles, tmp_path, weights):
    plain = copy.deepcopy(tiny_base.model)
    parts = [(read_lora(read_bundle(bundles[n])), w) for n, w in weights.items()]
    folder = write_blend(tmp_path / "cache", "mix", parts, tiny_base.hub_id)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["r"] == config["lora_alpha"] == sum(read_bundle(bundles[n]).rank for n in weights)
    # What vLLM loads is a standard PEFT folder: plain PEFT on the plain base gives the hand-merged model.
    served = PeftModel.from_pretrained(copy.deepcopy(plain), folder)
    want = merged_bundles(plain, {n: bundles[n] for n in weights}, weights)
    inputs = tokenizer(["Hello there, a prompt"], return_tensors="pt")
    with torch.no_grad():
        got, ref, base = served(**inputs).logits, want(**inputs).logits, plain(**inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert (got - base).abs().max() > 1e-2
    assert write_blend(tmp_path / "cache", "mix", [], tiny_base.hub_id) == folder  # written once, then reused


def test_blend_folders_are_named_by_content_not_by_adapter_name(tiny_base, bundles):
    kind, terse = (bundle_digest(read_bundle(bundles[n])) for n in ("kind", "terse"))
    assert blend_digest([(kind, 0.5), (terse, 0.5)]) == blend_digest([(terse, 0.5), (kind, 0.5)])
    assert blend_digest([(kind, 0.5), (terse, 0.5)]) != blend_digest([(kind, 0.5), (terse, -0.5)])
    assert write_blend(bundles["kind"].parent / "c", "zero", [(read_lora(read_bundle(bundles["kind"])), 0.0)],
                       tiny_base.hub_id) is None  # every weight zero: the base, no LoRA


@pytest.fixture
def engine(tiny_model_dir, bundles):
    """Not started: attaching and validating need no vLLM."""
    def make(**options) -> VllmEngine:
        engine = VllmEngine(load_base_skeleton(str(tiny_model_dir), device="cpu", dtype="float32"),
                            VllmOptions(**options))
        for name, path in bundles.items():
            engine.attach_adapter(name, read_bundle(path))
        return engine

    return make


def test_the_skeleton_base_holds_no_weights(tiny_model_dir):
    base = load_base_skeleton(str(tiny_model_dir), device="cpu", dtype="float32")
    assert all(p.device.type == "meta" for p in base.model.parameters())
    assert base.path == tiny_model_dir.resolve() and base.fingerprint["num_hidden_layers"] == 4


def test_refusals_name_the_engine_and_the_reason(engine):
    compiled = engine(steering=False, max_lora_rank=4)
    assert compiled.adapters == ["kind", "terse"]
    with pytest.raises(UnsupportedByEngine, match="vLLM engine.*--vllm-compile") as err:
        compiled.validate(GenerationRequest([1, 2], steering=SteeringSpec("kind", 2.0)))
    assert err.value.status == 400 and err.value.code == "unsupported_by_engine"
    compiled.validate(GenerationRequest([1, 2], steering=SteeringSpec("kind", 0.0)))  # zero is off: fine
    with pytest.raises(LimitExceeded, match=r"rank 6 .*--max-lora-rank 4 of the vLLM engine"):
        compiled.validate(GenerationRequest([1, 2], blend=(("kind", 0.5), ("terse", 0.5))))
    with pytest.raises(LimitExceeded, match="vLLM engine"):
        engine(max_lora_rank=2)


def test_steering_travels_as_extra_args_and_salts_the_prefix_cache():
    request = GenerationRequest([1, 2], steering=SteeringSpec("kind", 2.0, (15,)))
    args = steering_args(request, [1, 2, 15])
    assert args == {"adapter": "kind", "coeff": 2.0, "layers": [15]}
    assert steering_args(GenerationRequest([1], steering=SteeringSpec("kind", 2.0)), [2, 1])["layers"] == [1, 2]
    assert steering_args(GenerationRequest([1], steering=SteeringSpec("kind", 0.0)), [1]) is None
    salts = {cache_salt(args, 1), cache_salt(args, 2), cache_salt({**args, "coeff": 3.0}, 1), cache_salt(None, 1)}
    assert len(salts) == 4 and cache_salt(None, 1) is None


def _runner(rows: list[tuple[str, int, dict | None]]) -> SimpleNamespace:
    """A stand-in for vLLM's model runner: requests in batch order, their token counts and extra_args."""
    offsets = np.cumsum([0] + [n for _, n, _ in rows])
    requests = {rid: SimpleNamespace(sampling_params=SimpleNamespace(extra_args={STEERING_KEY: spec} if spec else None))
                for rid, _, spec in rows}
    return SimpleNamespace(input_batch=SimpleNamespace(num_reqs=len(rows), req_ids=[r for r, _, _ in rows] + ["old"]),
                           query_start_loc=SimpleNamespace(np=offsets), requests=requests)


def test_each_request_steers_only_its_own_tokens():
    v1, v2 = torch.arange(4.0), torch.ones(4)
    rows = [("base", 3, None), ("steered", 1, {"adapter": "a", "coeff": 2.0, "layers": [1, 2]}),
            ("other", 2, {"adapter": "a", "coeff": -1.0, "layers": [2]}), ("gone", 1, {"adapter": "x", "coeff": 1.0,
                                                                                     "layers": [1]})]
    deltas = _BatchSteering(_runner(rows), {"a": {1: v1, 2: v2}})._build(torch.zeros(7, 4))
    assert sorted(deltas) == [1, 2]
    torch.testing.assert_close(deltas[1], torch.stack([torch.zeros(4)] * 3 + [2 * v1] + [torch.zeros(4)] * 3))
    torch.testing.assert_close(deltas[2], torch.stack([torch.zeros(4)] * 3 + [2 * v2, -v2, -v2, torch.zeros(4)]))
    assert _BatchSteering(_runner([("base", 5, None)]), {"a": {1: v1}})._build(torch.zeros(5, 4)) == {}


def test_the_hook_adds_to_the_residual_stream_part_of_a_block_output():
    class Batch:
        vectors = {"a": {}}

        def delta(self, layer, hidden):
            return torch.ones(2, 3) * layer

    hidden, residual = torch.zeros(3, 3), torch.full((3, 3), 5.0)
    out_hidden, out_residual = _adder(Batch(), 2)(None, (), (hidden, residual))
    assert out_hidden[:2].eq(2).all() and out_hidden[2].eq(0).all()  # the third row is padding
    assert out_residual is residual and hidden.eq(0).all()  # nothing changed in place
    assert _adder(Batch(), 1)(None, (), torch.zeros(2, 3)).eq(1).all()  # a block returning the stream itself


def test_logprobs_are_converted_with_their_alternatives_most_likely_first():
    entry = {7: SimpleNamespace(logprob=-2.0, rank=3), 1: SimpleNamespace(logprob=-0.1, rank=1),
             4: SimpleNamespace(logprob=-1.0, rank=2)}
    got = token_logprob(7, entry, 2)
    assert (got.token, got.logprob, got.top) == (7, -2.0, ((1, -0.1), (4, -1.0)))
    assert token_logprob(7, entry, 0).top == ()
    first, second = prompt_logprobs([5, 7], [None, entry], 1)
    assert first.logprob is None and second.top == ((1, -0.1),)


def test_without_vllm_the_engine_says_how_to_get_it(engine, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM gives on import
    with pytest.raises(RahfError, match="setup_vllm_cpu.sh"):
        engine().start()
