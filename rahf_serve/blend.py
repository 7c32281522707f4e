"""Exact blends of loaded adapters, built once per (name, weight) combination and cached.

A blend sum_i w_i * s_i * B_i A_i is one LoRA of rank sum(r_i): stack the rows w_i * s_i * A_i and
the columns B_i, scaling 1. That is PEFT's `add_weighted_adapter(combination_type="cat")`, exact for
any sign of weight (PEFT's "linear" mixes sqrt(w) into both factors and is not).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
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
    """Blend adapters living in the PeftModel, least recently used evicted first (never one in use)."""

    def __init__(self, max_blends: int = 8) -> None:
        self.max_blends = max_blends
        self._blends: OrderedDict[BlendKey, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blends)

    def get(self, model: Any, key: BlendKey, in_use: Collection[str]) -> str:
        """The adapter name of blend `key`, building it (and evicting an idle blend) if needed."""
        if key in self._blends:
            self._blends.move_to_end(key)
            return self._blends[key]
        for old_key, old_name in list(self._blends.items()):
            if len(self._blends) < self.max_blends:
                break
            if old_name not in in_use:
                model.delete_adapter(old_name)
                del self._blends[old_key]
        name = blend_name(key)
        build_blend(model, key, name)
        self._blends[key] = name
        return name

    def invalidate(self, model: Any, component: str) -> list[str]:
        """Delete every blend built from `component` (which is being removed); returns their names."""
        gone = [(k, n) for k, n in self._blends.items() if any(c == component for c, _ in k)]
        for key, name in gone:
            model.delete_adapter(name)
            del self._blends[key]
        return [n for _, n in gone]
