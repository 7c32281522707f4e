"""Small builders the tests share."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model

from rahf_serve.bundle import new_manifest, peft_payload, write_bundle
from rahf_serve.models import BaseModel

_Built = TypeVar("_Built")


def built_for(isa: str, build: Callable[[], _Built]) -> _Built:
    """`build()` as a machine on which torch found `isa` would build it (the C kernels' flags follow torch's
    finding): the tests check each build this machine can stand in for, benchmarks compare two."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
        return build()


def random_lora_bundle(base: BaseModel, out: Path, *, seed: int = 0, r: int = 4,
                       targets: tuple[str, ...] = ("q_proj", "v_proj"), with_vectors: bool = True,
                       dropout: float = 0.0) -> Path:
    """A bundle whose LoRA has non-zero B (so it changes logits) and random steering vectors."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, lora_dropout=dropout,
                        base_model_name_or_path=base.hub_id)
    # Wrap a copy so `base.model` stays a plain model for the test that called us.
    import copy

    peft_model = get_peft_model(copy.deepcopy(base.model), config)
    adapter_config, state = peft_payload(peft_model)
    layers = [1, base.model.config.num_hidden_layers // 2]
    vectors = {layer: torch.randn(base.model.config.hidden_size) for layer in layers} if with_vectors else None
    manifest = new_manifest(name=out.name, base_id=base.hub_id, base_revision=base.revision,
                            base_fingerprint=base.fingerprint, method="scit", layers=layers, alpha=5.0,
                            lora={"r": r, "lora_alpha": 2 * r, "target_modules": list(targets)}) if with_vectors else None
    return write_bundle(out, adapter_config=adapter_config, lora_state=state, vectors=vectors, manifest=manifest)


def merged_by_hand(plain: torch.nn.Module, peft_model: PeftModel, weights: dict[str, float]) -> torch.nn.Module:
    """Reference: W + sum_i w_i * scaling_i * B_i @ A_i written into a copy of the plain weights."""
    ref = copy.deepcopy(plain)
    modules = dict(ref.named_modules())
    for name, module in peft_model.get_base_model().named_modules():
        if not hasattr(module, "lora_A"):
            continue
        target = modules[name]
        for adapter, w in weights.items():
            if adapter in module.lora_A:
                delta = module.lora_B[adapter].weight @ module.lora_A[adapter].weight
                target.weight.data += w * module.scaling[adapter] * delta
    return ref


def merged_bundles(plain: torch.nn.Module, bundles: Mapping[str, Path], weights: Mapping[str, float]) -> torch.nn.Module:
    """Reference for a served blend: plain PEFT loads each bundle, the weighted deltas go into a copy of `plain`."""
    peft_model: PeftModel | None = None
    for name, path in bundles.items():
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(copy.deepcopy(plain), path, adapter_name=name)
        else:
            peft_model.load_adapter(path, adapter_name=name)
    assert peft_model is not None
    return merged_by_hand(plain, peft_model, weights)


@contextmanager
def steered_by_hand(model: torch.nn.Module, vectors: Mapping[int, torch.Tensor], coeff: float) -> Iterator[None]:
    """Reference steering: coeff * vectors[l] added to hidden_states[l], the output of decoder block l - 1."""
    def adder(vec: torch.Tensor):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (output[0] + coeff * vec,) + output[1:]
            return output + coeff * vec
        return hook

    handles = [model.model.layers[layer - 1].register_forward_hook(adder(v)) for layer, v in vectors.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, ids: Sequence[int]) -> list[float]:
    """log p(ids[j] | ids[:j]) for j >= 1: one unpadded forward pass, log-softmax in float64."""
    logits = model(input_ids=torch.tensor([list(ids)])).logits[0, :-1].double()
    return F.log_softmax(logits, dim=-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
