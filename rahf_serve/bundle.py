"""The adapter bundle: one folder that is trained, pushed, pulled and served.

    adapter_config.json          standard PEFT LoRA config
    adapter_model.safetensors    standard PEFT LoRA weights (plain PeftModel.from_pretrained loads it)
    rahf_vectors.safetensors     layers.{l}.mean_diff [hidden], l indexes `hidden_states` (1..num_layers)
    rahf.json                    manifest: base fingerprint, method, layers, alpha, data, metrics, versions
    README.md                    Hub model card

`rahf_vectors.safetensors` and `rahf.json` come as a pair; without them the folder is a plain
PEFT LoRA, which serves as an adapter without steering. Only safetensors are ever read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import (
    BundleError,
    BundleNotFound,
    CorruptBundleError,
    FingerprintMismatch,
    LimitExceeded,
    NoMatchingModules,
    UnsafeFileError,
)
from .vectors import load_vectors, save_vectors

FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
VECTORS_FILE = "rahf_vectors.safetensors"
MANIFEST_FILE = "rahf.json"
CARD_FILE = "README.md"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
DEFAULT_MAX_RANK = 256
DEFAULT_MAX_BYTES = 1 << 30
_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


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


# ---------------------------------------------------------------- writing


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
    if any(k.startswith(_PEFT_PREFIX) is False for k in lora_state):
        raise BundleError(f"LoRA keys must start with {_PEFT_PREFIX!r} (PEFT's saved form)")
    out.parent.mkdir(parents=True, exist_ok=True)
    _recover(out)
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


def _recover(out: Path) -> None:
    """Put back the previous bundle if a writer was killed between the two renames of `replace_dir`."""
    if not out.exists():
        aside = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if aside:
            os.replace(aside[-1], out)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished temp dir to `out`: readers see the old folder or the new one, never a mix."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def render_card(manifest: Mapping[str, Any] | None, adapter_config: Mapping[str, Any]) -> str:
    """A Hub model card: YAML front matter Hub understands, then what a user needs to know."""
    base = (manifest or {}).get("base", {}).get("id") or adapter_config.get("base_model_name_or_path") or "unknown"
    lines = ["---", "library_name: peft", f"base_model: {base}", "tags:", "- rahf", "- lora",
             "- representation-engineering", "- alignment", "license: apache-2.0", "---", ""]
    if not manifest:
        lines += ["# LoRA adapter", "", f"A PEFT LoRA adapter for `{base}`.", ""]
        return "\n".join(lines)
    name = manifest.get("name", "RAHF adapter")
    lines += [f"# {name}", "",
              f"A LoRA adapter for `{base}` trained with RAHF (Representation Alignment from Human "
              f"Feedback, arXiv 2312.15997), method **{manifest.get('method')}**, by "
              "rahf-serve's `rahf-train`. It loads with plain PEFT and with rahf-serve, which also "
              "uses its mean difference vectors (`rahf_vectors.safetensors`) for steering.", ""]
    if manifest.get("base", {}).get("note"):
        lines += [f"Base weights: {manifest['base']['note']}.", ""]
    data = manifest.get("data") or {}
    if data:
        lines += ["## Data", "", f"`{data.get('name')}`: {data.get('pairs')} preference pairs "
                  f"(sha256 `{str(data.get('sha256', ''))[:16]}…`).", ""]
    lines += ["## Training", ""]
    if manifest.get("composition"):
        lines += [f"- model: {manifest['composition']}"]
    val = manifest.get("phase1_validation")
    if val:
        verdict = "separated" if val["separated"] else "did NOT separate (collected with --force)"
        lines += [f"- phase 1 on validation rows {val['rows']}: separation {val['first']['separation']:+.4f} -> "
                  f"{val['last']['separation']:+.4f} nats/token, {verdict}"]
    lines += [f"- target layers: {manifest.get('layers')}", f"- alpha: {manifest.get('alpha')}",
              f"- LoRA: {json.dumps(manifest.get('lora', {}))}", f"- steps: {json.dumps(manifest.get('steps', {}))}"]
    if manifest.get("command"):
        lines += ["", "Reproduce with:", "", "```bash", str(manifest["command"]), "```"]
    metrics = manifest.get("metrics") or {}
    if "preference_accuracy_aligned" in metrics:  # what `rahf-train eval --record` writes
        lines += ["", "## Metrics", "", *_metric_lines(metrics)]
    elif metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in metrics.items() if not isinstance(v, (dict, list))]
    lines += ["", "## Use", "", "```bash", f"rahf-serve --adapter {name}=<this repo or folder>", "```", ""]
    return "\n".join(lines)


def _interval(values: Any) -> str:
    return f" [{values[0]:.3f}, {values[1]:.3f}]" if values else ""


def _metric_lines(m: Mapping[str, Any]) -> list[str]:
    """The card's metrics: held-out preference scores with 95% intervals and the paired test."""
    where = f"`{m['eval_data']}` rows {m.get('eval_rows') or 'all'}" if m.get("eval_data") else f"rows {m.get('eval_rows')}"
    lines = [f"Held-out {where} ({m.get('eval_pairs')} pairs). Preference accuracy: share of pairs whose chosen "
             "answer has the higher mean per-token log-likelihood (plain chat template, no instruction); margin: "
             "mean of that difference in nats/token. Intervals are 95%.", "",
             "| model | preference accuracy | mean margin |", "| --- | --- | --- |",
             f"| base | {m['preference_accuracy_base']:.3f} | {m['mean_margin_base']:+.4f} |",
             f"| this adapter | {m['preference_accuracy_aligned']:.3f}{_interval(m.get('preference_accuracy_aligned_ci'))} "
             f"| {m['mean_margin_aligned']:+.4f} |"]
    if "mcnemar_p" in m:
        diff = m["preference_accuracy_aligned"] - m["preference_accuracy_base"]
        lines += ["", f"Against the base on the same pairs: {diff:+.3f}{_interval(m.get('preference_accuracy_diff_ci'))} "
                      f"(paired bootstrap), exact McNemar p = {m['mcnemar_p']:.2g}."]
    if "transfer" in m:
        t = m["transfer"]
        lines += ["", f"Transfer, `{t['data']}` rows {t['rows']} ({t['pairs']} pairs): accuracy base "
                      f"{t['accuracy_base']:.3f}, this adapter {t['accuracy_aligned']:.3f}."]
    for key, d in m.items():
        if key.startswith("decline_rate_"):
            health = d.get("distinct2")
            lines += ["", f"Greedy answers to {d['prompts']} {key.removeprefix('decline_rate_')} prompts that decline "
                          f"(fixed phrase rule): base {d['base']:.2f}, this adapter {d['aligned']:.2f}"
                          + (f"; distinct-2 of those answers (repetition: lower is worse) base {health['base']:.3f}, "
                             f"this adapter {health['aligned']:.3f}." if health else ".")]
    return lines


# ---------------------------------------------------------------- reading


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
        _recover(root)
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
        match = _LORA_KEY.match(key)
        if not match or not key.startswith(_PEFT_PREFIX):
            raise CorruptBundleError(f"{weights}: unexpected tensor {key!r} (only LoRA A/B weights are allowed)")
        module = match["module"][len(_PEFT_PREFIX):]
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


# ---------------------------------------------------------------- fitting a base


def _linear_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """module path -> (in_features, out_features) of every Linear in the plain base model."""
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    out: dict[str, tuple[int, int]] = {}
    for name, module in root.named_modules():
        layer = getattr(module, "base_layer", module)
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in name and not name.endswith(".base_layer"):
            out[name] = (layer.in_features, layer.out_features)
    return out


def check_fits(bundle: Bundle, model: torch.nn.Module, base_fingerprint: Mapping[str, Any],
               base_name: str = "the loaded base") -> None:
    """Raise unless the bundle fits this base: same fingerprint, and every LoRA pair on a real Linear."""
    if bundle.manifest is not None:
        theirs = bundle.manifest["base"]["fingerprint"]
        diffs = [f"{k} {theirs.get(k)} vs {base_fingerprint.get(k)}" for k in base_fingerprint
                 if theirs.get(k) != base_fingerprint.get(k)]
        if diffs:
            raise FingerprintMismatch(
                f"adapter {bundle.path.name} was trained on {bundle.base_id} ({_fmt(theirs)}) but the loaded base "
                f"is {base_name} ({_fmt(base_fingerprint)}); differs in: {', '.join(diffs)}")
        hidden = base_fingerprint.get("hidden_size")
        for layer, vec in bundle.vectors.items():
            if vec.shape[0] != hidden or not 0 < layer <= int(base_fingerprint.get("num_hidden_layers", layer)):
                raise FingerprintMismatch(f"adapter {bundle.path.name}: steering vector for layer {layer} has "
                                          f"size {vec.shape[0]}, the base has hidden size {hidden}")
    linears = _linear_shapes(model)
    matched = [m for m in bundle.lora_shapes if m in linears]
    if not matched:
        targets = bundle.adapter_config.get("target_modules")
        raise NoMatchingModules(
            f"adapter {bundle.path.name} (target_modules={targets}) matches no module of {base_name}: "
            f"it would change nothing. First weight is for {next(iter(bundle.lora_shapes))!r}")
    missing = sorted(set(bundle.lora_shapes) - set(linears))
    if missing:
        raise FingerprintMismatch(f"adapter {bundle.path.name} has weights for modules {base_name} lacks, "
                                  f"e.g. {missing[0]!r}")
    for module in matched:
        in_f, out_f = linears[module]
        a, b = bundle.lora_shapes[module]["A"], bundle.lora_shapes[module]["B"]
        if a[1] != in_f or b[0] != out_f:
            raise FingerprintMismatch(f"adapter {bundle.path.name}: {module} LoRA shapes A{list(a)} B{list(b)} "
                                      f"do not fit {base_name}'s Linear({in_f}, {out_f})")


def _fmt(fp: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fp.items())


def attach(model: torch.nn.Module, bundle: Bundle, name: str, base_fingerprint: Mapping[str, Any],
           base_name: str = "the loaded base") -> Any:
    """Validate, then load the bundle's LoRA into `model` as adapter `name`; returns the PeftModel.

    The first adapter wraps a plain model in a PeftModel; later ones are added to it, so one copy of
    the base weights serves every adapter.
    """
    from peft import PeftModel

    check_fits(bundle, model, base_fingerprint, base_name)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(bundle.path), adapter_name=name, is_trainable=False)
            return model
        return PeftModel.from_pretrained(model, str(bundle.path), adapter_name=name, is_trainable=False)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise BundleError(f"PEFT could not load adapter {bundle.path.name}: {err}") from err


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

    from . import __version__

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
