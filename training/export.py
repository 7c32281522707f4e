"""Exports of a bundle for servers that are not rahf-serve.

- `export_merged`: the LoRA folded into the base weights, saved as a plain transformers model
  (safetensors + tokenizer + config) that vLLM, TGI, llama.cpp's converter or `from_pretrained` load.
- `export_control_vector`: the mean difference vectors as a llama.cpp control-vector GGUF
  (`llama-cli --control-vector cv.gguf`).

Layer numbering. Our `layers.{l}.mean_diff` indexes `hidden_states`: l is the residual stream
*after* decoder block l-1 (hidden_states[0] is the embeddings). llama.cpp adds `direction.{n}`
to the output of block n (`build_cvec(cur, il)` at the end of block il, loaded from
`direction.{il}`), and it rejects `direction.0` because it keeps no tensor for block 0. So
l maps to n = l - 1, and a vector for l = 1 (block 0's output) has no llama.cpp equivalent: it is
left out and reported in `ControlVectorExport.skipped`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rahf_serve.bundle import Bundle, attach, read_bundle, replace_dir
from rahf_serve.errors import BundleError
from rahf_serve.models import EMBEDDED_ALIAS, load_base
from rahf_serve.sources import resolve_source

EXPORT_NOTE = "rahf_export.json"
_ADAPTER_NAME = "export"


def gguf_direction_index(layer: int) -> int:
    """llama.cpp's `direction.{n}` index for our hidden_states index `layer` (see module docstring)."""
    return layer - 1


@dataclass
class ControlVectorExport:
    """What `export_control_vector` wrote."""

    path: Path
    directions: dict[int, int] = field(default_factory=dict)
    """our hidden_states layer -> llama.cpp direction index, for every vector written"""
    skipped: list[int] = field(default_factory=list)
    """our layers that llama.cpp cannot steer (block 0's output), left out"""


def _load(bundle_source: str) -> Bundle:
    return read_bundle(resolve_source(bundle_source))


def export_merged(bundle_source: str, out_dir: str | os.PathLike[str], base: str = EMBEDDED_ALIAS) -> Path:
    """Fold the bundle's LoRA into `base` and save the full model to `out_dir` atomically.

    The merge runs on CPU in float32 so that the saved weights lose nothing to rounding; the
    steering vectors are not part of the merged model (export them with `export_control_vector`).
    """
    from transformers import AutoTokenizer

    bundle = _load(bundle_source)
    loaded = load_base(base, device="cpu", dtype="float32")
    peft_model = attach(loaded.model, bundle, _ADAPTER_NAME, loaded.fingerprint, loaded.name)
    merged = peft_model.merge_and_unload()
    # load_base switched the tokenizer to left padding for batched decoding; ship the base's own.
    tokenizer = AutoTokenizer.from_pretrained(loaded.path, trust_remote_code=False)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        note = {
            "bundle": bundle.path.name,
            "bundle_source": bundle_source,
            "base": {"id": loaded.hub_id, "revision": loaded.revision, "note": loaded.source_note},
            "lora": {k: bundle.adapter_config.get(k) for k in ("r", "lora_alpha", "target_modules")},
            "steering_vectors": "not included; see export_control_vector",
        }
        (tmp / EXPORT_NOTE).write_text(json.dumps(note, indent=2))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_control_vector(bundle_source: str, out_path: str | os.PathLike[str], coeff: float = 1.0) -> ControlVectorExport:
    """Write the bundle's mean difference vectors, times `coeff`, as a llama.cpp control-vector GGUF.

    llama.cpp scales at load time too (`--control-vector-scaled cv.gguf 0.5`), so `coeff` is for
    shipping a file whose default strength is already right.
    """
    from gguf import GGUFWriter

    bundle = _load(bundle_source)
    if not bundle.has_steering or bundle.manifest is None:
        raise BundleError(f"{bundle.path} has no mean difference vectors ({bundle.path.name} is a plain LoRA)")
    result = ControlVectorExport(Path(out_path))
    for layer in sorted(bundle.vectors):
        if gguf_direction_index(layer) < 1:
            result.skipped.append(layer)
        else:
            result.directions[layer] = gguf_direction_index(layer)
    if not result.directions:
        raise BundleError(f"{bundle.path.name}: vectors only for layers {result.skipped}, which llama.cpp "
                          "cannot steer (it has no control vector after block 0)")
    fingerprint = bundle.manifest["base"]["fingerprint"]
    out = result.path
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        writer = GGUFWriter(tmp_name, "controlvector")
        writer.add_name(str(bundle.manifest.get("name", bundle.path.name)))
        # llama.cpp's loader reads only the tensors; these keys are what its cvector-generator writes.
        writer.add_string("controlvector.model_hint", str(fingerprint["model_type"]))
        writer.add_uint32("controlvector.layer_count", len(result.directions))
        writer.add_string("rahf.base_model", str(bundle.base_id))
        writer.add_float32("rahf.coeff", float(coeff))
        writer.add_array("rahf.source_layers", sorted(result.directions))
        for layer, index in result.directions.items():
            vector = (bundle.vectors[layer].to(torch.float32) * coeff).numpy()
            writer.add_tensor(f"direction.{index}", np.ascontiguousarray(vector, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp_name, out)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return result
