"""Checks of what a request selects (adapter, blend, steering) against what an engine has loaded.

Engine-independent, so every engine refuses the same requests with the same messages; `where` names the
engine in limit messages ("" for the built-in one, whose flags are the server's defaults).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .blend import BlendKey
from .errors import InvalidRequest, LimitExceeded, ModelNotFound
from .lora_slots import LoraWeights, blend_rank
from .request import SteeringSpec


def check_blend(adapter: str | None, blend: BlendKey | None, loras: Mapping[str, LoraWeights], max_lora_rank: int,
                where: str = "") -> None:
    """Raise unless every adapter named is in `loras`, weights are finite and the blend's rank fits."""
    if adapter is not None and blend:
        raise InvalidRequest("give either an adapter as `model` or a blend in `adapters`, not both")
    for name in [adapter] + [n for n, _ in blend or ()]:
        if name is not None and name not in loras:
            raise ModelNotFound(f"adapter {name!r} is not loaded")
    for _, weight in blend or ():
        if not math.isfinite(weight):
            raise InvalidRequest("blend weights must be finite numbers")
    if blend:
        rank = blend_rank([(loras[n], w) for n, w in blend])
        if rank > max_lora_rank:
            raise LimitExceeded(f"this blend has LoRA rank {rank} (the sum of its adapters' ranks), above "
                                f"--max-lora-rank {max_lora_rank}{where}; use fewer adapters or restart the "
                                "server with a larger --max-lora-rank")


def steering_layers(spec: SteeringSpec, available: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """The layers `spec` steers, given each loaded adapter's vector layers; raises for what cannot be steered."""
    if spec.adapter not in available:
        raise ModelNotFound(f"adapter {spec.adapter!r} is not loaded")
    layers = tuple(available[spec.adapter])
    if not layers:
        raise InvalidRequest(f"adapter {spec.adapter!r} has no steering vectors (no rahf_vectors.safetensors)")
    if not math.isfinite(spec.coeff):
        raise InvalidRequest("steering coeff must be a finite number")
    chosen = spec.layers if spec.layers is not None else layers
    unknown = sorted(set(chosen) - set(layers))
    if unknown:
        raise InvalidRequest(f"adapter {spec.adapter!r} has no steering vector for layers {unknown}; "
                             f"it has {sorted(layers)}")
    return tuple(chosen)
