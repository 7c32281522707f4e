"""Reading and checking a bundle's files on their own, before any model is involved: only
safetensors, sizes and ranks within limits, LoRA pairs complete, manifest and vectors together."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..errors import BundleError, BundleNotFound, CorruptBundleError, LimitExceeded, UnsafeFileError
from ..vectors import load_vectors
from .atomic import recover
from .layout import (
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RANK,
    FORMAT_VERSION,
    LORA_KEY,
    MANIFEST_FILE,
    PEFT_PREFIX,
    PICKLE_SUFFIXES,
    VECTORS_FILE,
    WEIGHTS_FILE,
    Bundle,
)


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of every tensor in a safetensors file; a corrupt header is a CorruptBundleError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError
        raise CorruptBundleError(f"{path.name} in {path.parent} is not a valid safetensors file: {err}") from err


def read_bundle(
    path: str | os.PathLike[str], *, max_rank: int = DEFAULT_MAX_RANK, max_bytes: int = DEFAULT_MAX_BYTES
) -> Bundle:
    """Read and check a bundle's files on their own (no base model needed)."""
    root = Path(path)
    if root.parent.is_dir():
        recover(root)
    if not root.is_dir():
        raise BundleNotFound(f"adapter bundle {root} does not exist or is not a directory")
    pickles = sorted(p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeFileError(
            f"{root} contains pickle files {pickles}; rahf-serve loads only safetensors (pickle can run code)"
        )
    for required in (CONFIG_FILE, WEIGHTS_FILE):
        if not (root / required).is_file():
            raise CorruptBundleError(f"{root} is not an adapter bundle: {required} is missing")
    total = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    if total > max_bytes:
        raise LimitExceeded(f"{root} holds {total} bytes, above the limit of {max_bytes}")
    try:
        config = json.loads((root / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptBundleError(f"{root / CONFIG_FILE} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise CorruptBundleError(f"{root / CONFIG_FILE}: peft_type must be LORA, got {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise CorruptBundleError(f"{root / CONFIG_FILE}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise LimitExceeded(f"{root}: LoRA rank {rank} is above the limit of {max_rank}")
    if config.get("modules_to_save"):
        raise BundleError(f"{root}: modules_to_save is not supported (the bundle must be a pure LoRA)")
    shapes = _lora_shapes(root / WEIGHTS_FILE)
    manifest, vectors = _read_rahf_part(root)
    return Bundle(root, config, manifest, vectors, shapes)


def _lora_shapes(weights: Path) -> dict[str, dict[str, tuple[int, ...]]]:
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in _header(weights).items():
        match = LORA_KEY.match(key)
        if not match or not key.startswith(PEFT_PREFIX):
            raise CorruptBundleError(f"{weights}: unexpected tensor {key!r} (only LoRA A/B weights are allowed)")
        module = match["module"][len(PEFT_PREFIX):]
        shapes.setdefault(module, {})[match["ab"]] = shape
    if not shapes:
        raise CorruptBundleError(f"{weights} holds no LoRA weights")
    for module, ab in shapes.items():
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise CorruptBundleError(f"{weights}: LoRA pair for {module} is incomplete or its shapes disagree")
    return shapes


def _read_rahf_part(root: Path) -> tuple[dict[str, Any] | None, dict[int, torch.Tensor]]:
    has_manifest, has_vectors = (root / MANIFEST_FILE).is_file(), (root / VECTORS_FILE).is_file()
    if not has_manifest and not has_vectors:
        return None, {}
    if has_manifest != has_vectors:
        missing = VECTORS_FILE if has_manifest else MANIFEST_FILE
        raise CorruptBundleError(f"{root}: {missing} is missing ({MANIFEST_FILE} and {VECTORS_FILE} come together)")
    try:
        manifest = json.loads((root / MANIFEST_FILE).read_text())
        manifest["base"]["fingerprint"]  # noqa: B018 - presence check
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CorruptBundleError(f"{root / MANIFEST_FILE} is not a valid RAHF manifest: {err!r}") from err
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format {manifest['format_version']} is newer than this rahf-serve "
                          f"understands ({FORMAT_VERSION}); upgrade rahf-serve")
    _header(root / VECTORS_FILE)
    return manifest, load_vectors(root / VECTORS_FILE)
