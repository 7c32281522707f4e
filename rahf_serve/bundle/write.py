"""Writing a bundle, always whole: files go to a temp folder, which then replaces the old one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import BundleError
from ..vectors import save_vectors
from .atomic import recover, replace_dir
from .card import render_card
from .layout import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    PEFT_PREFIX,
    VECTORS_FILE,
    WEIGHTS_FILE,
)
from .read import read_bundle


def write_bundle(
    out_dir: str | os.PathLike[str],
    *,
    adapter_config: Mapping[str, Any],
    lora_state: Mapping[str, torch.Tensor],
    vectors: Mapping[int, torch.Tensor] | None,
    manifest: Mapping[str, Any] | None,
    card: str | None = None,
) -> Path:
    """Write a bundle atomically: readers see the old folder or the complete new one, never a mix."""
    out = Path(out_dir)
    if (vectors is None) != (manifest is None):
        raise BundleError("vectors and manifest are written together or not at all")
    if any(k.startswith(PEFT_PREFIX) is False for k in lora_state):
        raise BundleError(f"LoRA keys must start with {PEFT_PREFIX!r} (PEFT's saved form)")
    out.parent.mkdir(parents=True, exist_ok=True)
    recover(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(dict(adapter_config), indent=2, sort_keys=True))
        save_file({k: v.contiguous() for k, v in lora_state.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        if vectors is not None and manifest is not None:
            save_vectors(tmp / VECTORS_FILE, vectors, {"version": str(FORMAT_VERSION),
                                                       "method": str(manifest.get("method", ""))})
            (tmp / MANIFEST_FILE).write_text(json.dumps(dict(manifest), indent=2))
        (tmp / CARD_FILE).write_text(card if card is not None else render_card(manifest, adapter_config))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def rewrite_manifest(src_dir: str | os.PathLike[str], manifest: Mapping[str, Any],
                     dest_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the bundle at `src_dir` again (to `dest_dir`, default in place, atomically) with a new
    manifest; weights and vectors are carried over unchanged and the card is rendered anew."""
    bundle = read_bundle(src_dir)
    return write_bundle(src_dir if dest_dir is None else dest_dir, adapter_config=bundle.adapter_config,
                        lora_state=load_file(Path(src_dir) / WEIGHTS_FILE), vectors=bundle.vectors, manifest=manifest)
