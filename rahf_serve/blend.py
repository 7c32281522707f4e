"""Exact blends of loaded adapters: keys, slot names, and the PEFT build used offline (training).

A blend sum_i w_i * s_i * B_i A_i is one LoRA of rank sum(r_i): stack the rows w_i * s_i * A_i and
the columns B_i, scaling 1. That is PEFT's `add_weighted_adapter(combination_type="cat")`, exact for
any sign of weight (PEFT's "linear" mixes sqrt(w) into both factors and is not).
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from typing import Any

import torch

BLEND_PREFIX = "__blend_"
"""User adapter names cannot start with "_", so blend names never collide with them."""

BlendKey = tuple[tuple[str, float], ...]


def blend_key(components: Sequence[tuple[str, float]]) -> BlendKey:
    """Order-free key: a sum does not depend on the order of its terms; repeated names add up."""
    merged: dict[str, float] = {}
    for name, weight in components:
        merged[name] = merged.get(name, 0.0) + float(weight)
    return tuple(sorted(merged.items()))


def blend_name(key: BlendKey) -> str:
    return BLEND_PREFIX + hashlib.sha1(repr(key).encode()).hexdigest()[:12]


def build_blend(model: Any, key: BlendKey, name: str) -> None:
    """Add adapter `name` to the PeftModel `model` holding the exact weighted sum given by `key`."""
    names = [n for n, _ in key]
    weights = [w for _, w in key]
    if len(names) == 1:
        # PEFT turns a one-adapter "cat" into "linear" (sqrt(w) in both factors: wrong for w < 0).
        # A zero-weight second copy keeps it "cat"; its rows contribute exactly 0.
        names, weights = names * 2, weights + [0.0]
    model.add_weighted_adapter(names, weights, name, combination_type="cat")
    # PEFT creates the blend's dropout layers in training mode and copies the first adapter's rate: in an
    # eval-mode model that would drop activations at random in every blended forward pass.
    for module in model.modules():
        dropout = getattr(module, "lora_dropout", None)
        if isinstance(dropout, torch.nn.ModuleDict) and name in dropout:
            dropout[name].train(model.training)


class BlendCache:
    """Blend keys by slot name. Which blends stay resident is the LoRA slots' LRU, not this map's."""

    def __init__(self) -> None:
        self._keys: dict[str, BlendKey] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def name(self, key: BlendKey) -> str:
        """The slot name of blend `key`, remembered so that `key_of` can rebuild it."""
        name = blend_name(key)
        self._keys[name] = key
        return name

    def key_of(self, name: str) -> BlendKey | None:
        return self._keys.get(name)

    def keep(self, names: Collection[str]) -> None:
        """Forget every blend not in `names` (the resident ones): a request for it registers it again."""
        self._keys = {n: k for n, k in self._keys.items() if n in names}

    def invalidate(self, component: str) -> list[str]:
        """Forget every blend built from `component` (which is being removed); returns their names."""
        gone = [n for n, k in self._keys.items() if any(c == component for c, _ in k)]
        for name in gone:
            del self._keys[name]
        return gone
