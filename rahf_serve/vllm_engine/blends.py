"""Exact blends for vLLM: sum_i w_i * s_i * B_i A_i written once as a plain PEFT LoRA folder.

vLLM applies one LoRA per request, so a blend becomes one LoRA of rank sum(r_i) (`lora_slots.blend_lora`:
A rows stacked, scaled B columns stacked). The scalings are folded into B, so the folder says
r = lora_alpha = R (scaling 1); modules whose summed rank is below R are zero-padded to it, which adds
exactly nothing. Folders are content-addressed (a digest of the component files and weights), so a
blend is written once per cache and reused by later requests and later processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ..bundle import CONFIG_FILE, WEIGHTS_FILE, Bundle
from ..bundle.layout import PEFT_PREFIX
from ..lora_slots import LoraWeights, blend_lora


def bundle_digest(bundle: Bundle) -> str:
    """A digest of what makes a bundle's LoRA: its config and weight files."""
    h = hashlib.sha256()
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        h.update((bundle.path / file).read_bytes())
    return h.hexdigest()


def blend_digest(components: Sequence[tuple[str, float]]) -> str:
    """(component digest, weight) pairs -> the blend's folder name; equal sums share a folder."""
    return hashlib.sha256(repr(sorted(components)).encode()).hexdigest()[:24]


def write_blend(root: Path, digest: str, components: Sequence[tuple[LoraWeights, float]], base_id: str) -> Path | None:
    """The folder of the blend `digest` under `root`, written now if missing; None when every weight is 0."""
    folder = root / digest
    if (folder / WEIGHTS_FILE).is_file():
        return folder
    lora = blend_lora(components)
    if not lora.modules:
        return None
    rank = lora.rank
    tensors: dict[str, torch.Tensor] = {}
    for module, (a, b) in lora.modules.items():
        pad = rank - a.shape[0]
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.nn.functional.pad(a, (0, 0, 0, pad)).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.nn.functional.pad(b, (0, pad)).contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_id,
        "r": rank, "lora_alpha": rank, "lora_dropout": 0.0, "bias": "none", "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "inference_mode": True,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in lora.modules}),
    }
    _write_atomic(folder, tensors, config)
    return folder


def _write_atomic(folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> None:
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        os.replace(tmp, folder)
    except OSError:
        # Another process wrote the same blend first: its folder holds the same sum.
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / WEIGHTS_FILE).is_file():
            raise
