"""The difference-vector file: `layers.{l}.mean_diff` [hidden] tensors, l a `hidden_states` index.

One writer and one reader for every place that stores steering vectors (training's phase 2, the
bundle), so the format and its checks live in one file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CorruptBundleError

_KEY = re.compile(r"layers\.(\d+)\.mean_diff")


def save_vectors(path: str | os.PathLike[str], vectors: Mapping[int, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> None:
    tensors = {f"layers.{int(layer)}.mean_diff": v.detach().to("cpu", torch.float32).contiguous()
               for layer, v in sorted(vectors.items())}
    meta = {"format": "rahf-vectors", "layers": ",".join(str(layer) for layer in sorted(vectors)), **(metadata or {})}
    save_file(tensors, str(path), metadata=meta)


def load_vectors(path: str | os.PathLike[str]) -> dict[int, torch.Tensor]:
    """layer -> vector; any other tensor, or a vector that is not finite and 1-D, is a CorruptBundleError."""
    vectors: dict[int, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            match = _KEY.fullmatch(key)
            if not match:
                raise CorruptBundleError(f"{path}: unexpected tensor {key!r}")
            tensor = f.get_tensor(key)
            if tensor.ndim != 1 or not torch.isfinite(tensor).all():
                raise CorruptBundleError(f"{path}: {key} must be a finite 1-D vector")
            vectors[int(match[1])] = tensor
    return vectors
