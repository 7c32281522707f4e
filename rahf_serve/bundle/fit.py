"""Fitting a bundle to a loaded base: the fingerprint and every LoRA shape checked, then attached
through PEFT so that one copy of the base weights serves every adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import BundleError, FingerprintMismatch, NoMatchingModules
from .layout import Bundle


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
