"""Steering hooks and exact blends, against direct computations on plain models."""

from __future__ import annotations

import copy

import pytest
import torch

from rahf_serve.blend import BlendCache, blend_key, build_blend
from rahf_serve.bundle import attach, read_bundle
from rahf_serve.steering import Steer, add_steering, row_deltas, steering
from tests.helpers import merged_by_hand, random_lora_bundle


@pytest.fixture
def two_adapters(tiny_base, tmp_path):
    kind = read_bundle(random_lora_bundle(tiny_base, tmp_path / "kind", seed=1))
    terse = read_bundle(random_lora_bundle(tiny_base, tmp_path / "terse", seed=2, r=2,
                                           targets=("q_proj", "v_proj", "o_proj")))
    plain = copy.deepcopy(tiny_base.model)
    model = attach(tiny_base.model, kind, "kind", tiny_base.fingerprint)
    model = attach(model, terse, "terse", tiny_base.fingerprint)
    return plain, model


def batch(tokenizer, texts=("Hello there", "A longer second prompt here", "x")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


@pytest.mark.parametrize("weights", [{"kind": 0.7, "terse": -0.4}, {"kind": -1.5}, {"kind": 1.0, "terse": 1.0}])
def test_blend_equals_hand_merged_deltas(two_adapters, tokenizer, weights):
    plain, model = two_adapters
    key = blend_key(list(weights.items()))
    build_blend(model, key, "mix")
    inputs = batch(tokenizer)
    with torch.no_grad():
        got = model(**inputs, adapter_names=["mix"] * 3).logits
        want = merged_by_hand(plain, model, weights)(**inputs).logits
        base = plain(**inputs).logits
    mask = inputs["attention_mask"].bool()
    # fp32, tiny model: the factorised and the merged computation agree to ~1e-6; 1e-4 leaves margin.
    torch.testing.assert_close(got[mask], want[mask], atol=1e-4, rtol=1e-4)
    assert (got[mask] - base[mask]).abs().max() > 1e-2  # the blend really changes the logits


def test_a_blend_of_adapters_trained_with_dropout_is_deterministic(tiny_base, tokenizer, tmp_path):
    # The shipped adapters have lora_dropout 0.05; PEFT builds a blend's dropout layers in training mode.
    bundle = read_bundle(random_lora_bundle(tiny_base, tmp_path / "dropped", seed=4, dropout=0.5))
    plain = copy.deepcopy(tiny_base.model).eval()
    model = attach(tiny_base.model, bundle, "dropped", tiny_base.fingerprint).eval()
    build_blend(model, blend_key([("dropped", 0.8)]), "mix")
    inputs = batch(tokenizer)
    with torch.no_grad():
        first, second = (model(**inputs, adapter_names=["mix"] * 3).logits for _ in range(2))
        want = merged_by_hand(plain, model, {"dropped": 0.8})(**inputs).logits
    mask = inputs["attention_mask"].bool()
    assert torch.equal(first, second)
    torch.testing.assert_close(first[mask], want[mask], atol=1e-4, rtol=1e-4)


def test_blend_cache_names_keys_and_invalidates():
    cache = BlendCache()
    k1, k2, k3 = blend_key([("kind", 1.0)]), blend_key([("terse", 0.5), ("kind", 0.5)]), blend_key([("terse", 2.0)])
    n1, n2, n3 = cache.name(k1), cache.name(k2), cache.name(k3)
    assert cache.name(k1) == n1 and len({n1, n2, n3}) == 3 and len(cache) == 3
    assert blend_key([("kind", 0.5), ("terse", 0.5)]) == k2  # order-free
    assert cache.key_of(n2) == k2
    cache.keep([n1, n2, "kind"])  # n3 left its slot: forgotten until a request names it again
    assert cache.key_of(n3) is None and len(cache) == 2
    assert sorted(cache.invalidate("kind")) == sorted([n1, n2])
    assert len(cache) == 0 and cache.invalidate("terse") == []


def test_steering_only_touches_its_row(tiny_base, tokenizer):
    model, hidden = tiny_base.model, tiny_base.model.config.hidden_size
    inputs = batch(tokenizer)
    vec = {2: torch.randn(hidden), 3: torch.randn(hidden)}
    with torch.no_grad():
        baseline = model(**inputs).logits
        deltas = row_deltas([None, Steer(vec, 4.0), Steer(vec, 0.0)], hidden, torch.device("cpu"), torch.float32)
        with steering(model, deltas):
            steered = model(**inputs).logits
    assert torch.equal(steered[0], baseline[0]) and torch.equal(steered[2], baseline[2])
    assert (steered[1] - baseline[1]).abs().max() > 1e-3


def test_steering_adds_to_the_residual_stream_at_its_layer(tiny_base, tokenizer):
    """Reference: what block l receives (hidden_states[l] in the bundle's convention) moves by coeff * v.

    Read with a pre-hook on block l: transformers records `output_hidden_states` with its own hooks,
    which see a block's output before later forward hooks (ours) modify it.
    """
    model, hidden = tiny_base.model, tiny_base.model.config.hidden_size
    blocks = model.model.layers
    inputs = batch(tokenizer, ("one prompt",))
    vec = torch.randn(hidden)
    seen: list[torch.Tensor] = []
    probe = blocks[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))
    with torch.no_grad():
        model(**inputs)
        with add_steering(model, {2: (3.0 * vec)[None]}):
            model(**inputs)
    probe.remove()
    torch.testing.assert_close(seen[1], seen[0] + 3.0 * vec, atol=1e-5, rtol=0)


def test_coeff_zero_and_removal_are_bit_exact(tiny_base, tokenizer):
    model, hidden = tiny_base.model, tiny_base.model.config.hidden_size
    inputs = batch(tokenizer)
    vec = {1: torch.randn(hidden)}
    with torch.no_grad():
        baseline = model(**inputs).logits
        zero = row_deltas([Steer(vec, 0.0)] * 3, hidden, torch.device("cpu"), torch.float32)
        assert zero == {}  # coefficient zero installs no hook at all
        handle = add_steering(model, {1: torch.zeros(3, hidden)})
        assert torch.equal(model(**inputs).logits, baseline)
        handle.remove()
        handle = add_steering(model, row_deltas([Steer(vec, 5.0)] * 3, hidden, torch.device("cpu"), torch.float32))
        assert not torch.equal(model(**inputs).logits, baseline)
        handle.remove()
        assert torch.equal(model(**inputs).logits, baseline)


def test_steering_rejects_layer_out_of_range(tiny_base):
    with pytest.raises(ValueError, match="outside"):
        add_steering(tiny_base.model, {99: torch.zeros(1, 64)})
