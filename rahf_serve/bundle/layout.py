"""What a bundle is on disk: file names, format version, size limits, the validated `Bundle`
record, and the two things written into it (PEFT's LoRA payload and the RAHF manifest)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
VECTORS_FILE = "rahf_vectors.safetensors"
MANIFEST_FILE = "rahf.json"
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_MAX_RANK = 256
DEFAULT_MAX_BYTES = 1 << 30
PEFT_PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Bundle:
    """A validated bundle read from disk (not yet attached to any model)."""

    path: Path
    adapter_config: dict[str, Any]
    manifest: dict[str, Any] | None
    vectors: dict[int, torch.Tensor]
    lora_shapes: dict[str, dict[str, tuple[int, ...]]]
    """module path (relative to the base model) -> {"A": shape, "B": shape}"""

    @property
    def rank(self) -> int:
        return int(self.adapter_config.get("r", 0))

    @property
    def has_steering(self) -> bool:
        return bool(self.vectors)

    @property
    def base_id(self) -> str | None:
        if self.manifest:
            return self.manifest["base"]["id"]
        return self.adapter_config.get("base_model_name_or_path")


def peft_payload(model: Any, adapter_name: str = "default") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, state dict) of one adapter of a PeftModel, in PEFT's on-disk form."""
    from peft import get_peft_model_state_dict

    config = model.peft_config[adapter_name].to_dict()
    for key, value in list(config.items()):
        if isinstance(value, set):
            config[key] = sorted(value)
    config["peft_type"] = "LORA"
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return config, {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def new_manifest(
    *,
    name: str,
    base_id: str,
    base_revision: str | None,
    base_fingerprint: Mapping[str, Any],
    method: str,
    layers: list[int],
    alpha: float,
    lora: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    steps: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    base_note: str | None = None,
    command: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The `rahf.json` manifest, with the library versions that produced it."""
    import peft
    import transformers

    from .. import __version__

    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "base": {"id": base_id, "revision": base_revision, "fingerprint": dict(base_fingerprint), "note": base_note},
        "method": method,
        "layers": [int(layer) for layer in layers],
        "alpha": float(alpha),
        "lora": dict(lora),
        "data": dict(data or {}),
        "steps": dict(steps or {}),
        "metrics": dict(metrics or {}),
        "command": command,
        "versions": {"rahf_serve": __version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__},
        **extra,
    }
