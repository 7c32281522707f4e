"""Small builders the tests share."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from rahf_serve.bundle import new_manifest, peft_payload, write_bundle
from rahf_serve.models import BaseModel


def random_lora_bundle(base: BaseModel, out: Path, *, seed: int = 0, r: int = 4,
                       targets: tuple[str, ...] = ("q_proj", "v_proj"), with_vectors: bool = True) -> Path:
    """A bundle whose LoRA has non-zero B (so it changes logits) and random steering vectors."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False,
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
