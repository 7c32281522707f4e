"""Steering: add coeff * mean_diff to the residual stream, per row of a batch, with forward hooks.

Layer `l` follows the bundle's convention: it indexes `hidden_states`, i.e. the output of decoder
block `l - 1`. A hook adds a [batch, hidden] delta (zero rows are unsteered) to that block's output;
removing the handle restores the model exactly, since the hooks are the only change made.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Steer:
    """One row's steering: coeff times the given per-layer vectors."""

    vectors: Mapping[int, torch.Tensor]
    coeff: float


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM, through a PeftModel wrapper if there is one."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(root, "model", root)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise TypeError(f"cannot find decoder layers in {type(root).__name__} (expected .model.layers)")
    return layers


def row_deltas(rows: Sequence[Steer | None], hidden: int, device: torch.device,
               dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """layer -> [batch, hidden] additions for a batch whose row i is steered by rows[i] (None = off)."""
    layers = sorted({layer for s in rows if s is not None and s.coeff != 0.0 for layer in s.vectors})
    deltas = {layer: torch.zeros(len(rows), hidden, device=device, dtype=dtype) for layer in layers}
    for i, steer in enumerate(rows):
        if steer is None or steer.coeff == 0.0:
            continue
        for layer, vec in steer.vectors.items():
            deltas[layer][i] = steer.coeff * vec.to(device=device, dtype=dtype)
    return deltas


class SteeringHandle:
    """Hooks installed by `add_steering`; `remove()` takes every one of them out."""

    def __init__(self, hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_steering(model: torch.nn.Module, deltas: Mapping[int, torch.Tensor]) -> SteeringHandle:
    """Add deltas[l] to hidden_states[l]: [batch, hidden] at every position of each row, or
    [batch, length, hidden] position by position."""
    blocks = decoder_layers(model)
    hooks = []
    for layer, delta in deltas.items():
        if not 1 <= layer <= len(blocks):
            raise ValueError(f"steering layer {layer} is outside 1..{len(blocks)}")
        hooks.append(blocks[layer - 1].register_forward_hook(_adder(delta)))
    return SteeringHandle(hooks)


@contextmanager
def steering(model: torch.nn.Module, deltas: Mapping[int, torch.Tensor]) -> Iterator[SteeringHandle]:
    handle = add_steering(model, deltas)
    try:
        yield handle
    finally:
        handle.remove()


def _adder(delta: torch.Tensor) -> Any:
    # [batch, hidden] adds to every position of a row; [batch, length, hidden] per position (a packed step).
    delta = delta if delta.dim() == 3 else delta[:, None, :]

    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        # Decoder layers return a tensor in recent transformers and a tuple in older ones.
        if isinstance(output, tuple):
            return (output[0] + delta.to(output[0].dtype),) + output[1:]
        return output + delta.to(output.dtype)

    return hook
