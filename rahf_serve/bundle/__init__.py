"""The adapter bundle: one folder that is trained, pushed, pulled and served.

    adapter_config.json          standard PEFT LoRA config
    adapter_model.safetensors    standard PEFT LoRA weights (plain PeftModel.from_pretrained loads it)
    rahf_vectors.safetensors     layers.{l}.mean_diff [hidden], l indexes `hidden_states` (1..num_layers)
    rahf.json                    manifest: base fingerprint, method, layers, alpha, data, metrics, versions
    README.md                    Hub model card

`rahf_vectors.safetensors` and `rahf.json` come as a pair; without them the folder is a plain
PEFT LoRA, which serves as an adapter without steering. Only safetensors are ever read.

One job per module: `layout` (file names, limits, the `Bundle` record, the manifest), `atomic`
(folder swaps that survive a kill), `write`, `card` (the Hub model card), `read` (validation of
the files on their own) and `fit` (checking against, and attaching to, a base model).
"""

from .atomic import replace_dir
from .card import render_card
from .fit import attach, check_fits
from .layout import (
    CARD_FILE,
    CONFIG_FILE,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_RANK,
    FORMAT_VERSION,
    MANIFEST_FILE,
    VECTORS_FILE,
    WEIGHTS_FILE,
    Bundle,
    new_manifest,
    peft_payload,
)
from .read import read_bundle
from .write import rewrite_manifest, write_bundle

__all__ = [
    "CARD_FILE", "CONFIG_FILE", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_RANK", "FORMAT_VERSION", "MANIFEST_FILE",
    "VECTORS_FILE", "WEIGHTS_FILE", "Bundle", "attach", "check_fits", "new_manifest", "peft_payload",
    "read_bundle", "render_card", "replace_dir", "rewrite_manifest", "write_bundle",
]
