"""Phase 3: a fresh LoRA on top of the phase-1 model, trained so that its hidden states at the
target layers move to H_phase1 + alpha * v, v the per-token differences from phase 2 (masked mean
L2 over response tokens), as the paper and its reference code do (RAHF-SCIT builds on the SCIT
model, RAHF-Dual on the "good" model; LoRRA, without phase 1, on the plain base).

The phase-1 adapter is merged into an in-memory copy of the base, so the frozen targets come from
a pass through the same weights with the phase-3 adapter disabled: one copy serves both passes.
The LoRA wraps blocks 0..max(target)-1: hidden_states[l] is the output of block l-1, so later
blocks cannot move any target. The shipped model is ONE standard PEFT LoRA over the plain base:
the phase-1 and phase-3 LoRAs with their ranks concatenated, an exact sum (`compose`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict

from rahf_serve.blend import blend_key, build_blend
from rahf_serve.bundle import new_manifest, peft_payload, write_bundle
from rahf_serve.models import BaseModel

from .collect import load_diffs, load_vectors
from .config import LoraSettings, target_layers
from .context import Context, lora_config, only_trainable
from .encode import Encoded, collate
from .forward import block_outputs, block_outputs_and_logprobs
from .loop import Schedule, fit
from .losses import alignment_distance, position_kl
from .methods import Method, get_method
from .phase1 import validation_summary

PHASE = "bundle"  # RunDir.bundle
PHASE1_PART, PHASE3_PART, SHIPPED = "phase1", "phase3", "rahf"


def align_examples(ctx: Context, tokenizer, method: Method, summary: dict[str, Any]) -> list[Encoded]:
    """The plain (q, r) input of every stimulus phase 2 collected, in the same order."""
    stimuli = method.stimuli(ctx, tokenizer)
    if [[s.pair, s.side] for s in stimuli] != summary["stimuli"]:
        raise RuntimeError("the stimuli differ from those phase 2 collected; was the data, seed or method "
                           "changed since collect? Run collect again")
    return [s.plain for s in stimuli]


def alignment_sums(model, examples: list[Encoded], diffs: list[torch.Tensor], layers: list[int],
                   alpha: float, pad_id: int, kl: float = 0.0) -> dict[str, torch.Tensor]:
    """{"align": sum over target layers and response tokens of ||H_lora - (H_frozen + alpha * v)||},
    plus {"kl": kl x the sum over response tokens of KL(frozen || tuned)} when `kl` > 0."""
    passes = block_outputs if not kl else block_outputs_and_logprobs
    with torch.no_grad(), model.disable_adapter():
        frozen = passes(model, examples, pad_id, layers)
    tuned = passes(model, examples, pad_id, layers)
    sums = {}
    if kl:
        (frozen, reference), (tuned, logp) = frozen, tuned
        sums["kl"] = kl * position_kl(reference, logp).sum()
    device = tuned[layers[0]].device
    mask = collate(examples, pad_id).response_mask.to(device, tuned[layers[0]].dtype)
    total = torch.zeros((), device=device)
    for li, layer in enumerate(layers):
        v = torch.zeros_like(frozen[layer])
        for row, e in enumerate(examples):
            v[row, e.response_start:e.response_start + e.response_len] = diffs[row][li].to(device, v.dtype)
        total = total + alignment_distance(tuned[layer], frozen[layer] + alpha * v, mask)
    return {"align": total, **sums}


def phase1_merged(ctx: Context, method: Method) -> BaseModel:
    """A fresh base with the method's shipped phase-1 adapter merged into its weights (or the plain base)."""
    base = ctx.load_base()
    if method.shipped_adapter is not None:
        peft = PeftModel.from_pretrained(base.model, str(ctx.run.adapter(method.shipped_adapter)))
        base.model = peft.merge_and_unload()
    return base


def run_align(ctx: Context) -> list[float]:
    cfg, al, method = ctx.config, ctx.config.align, get_method(ctx.config.method)
    summary = json.loads(ctx.run.summary.read_text())
    layers = target_layers(cfg, summary["num_layers"])
    missing = sorted(set(layers) - set(summary["layers"]))
    if missing:
        raise ValueError(f"align.target_layers {missing} were not collected (phase 2 kept {summary['layers']}); "
                         "add them to collect.layers and run collect again")
    keep = [summary["layers"].index(layer) for layer in layers]
    diffs = {i: d[keep] for i, d in load_diffs(ctx.run).items()}
    base = phase1_merged(ctx, method)
    examples = align_examples(ctx, base.tokenizer, method, summary)
    pad = base.tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    # The LoRA ends below the deepest target: later blocks cannot move a target, and the KL term, if
    # any, reaches the LoRA through them.
    phase3_layers = list(range(max(layers)))
    model = get_peft_model(base.model, lora_config(al.lora, phase3_layers))
    only_trainable(model, "default")

    def counts(items: list[int]) -> dict[str, float]:
        tokens = float(sum(examples[i].response_len for i in items))
        return {"align": len(layers) * tokens, **({"kl": tokens} if al.kl_to_phase1 else {})}

    def sums(items: list[int]) -> dict[str, torch.Tensor]:
        return alignment_sums(model, [examples[i] for i in items], [diffs[i] for i in items], layers, al.alpha,
                              pad, al.kl_to_phase1)

    schedule = Schedule(steps=al.steps, batch_size=al.batch_size, micro_batch_size=al.micro_batch_size, lr=al.lr,
                        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
    losses = fit(ctx.acc, model, name="align", n_items=len(examples), counts=counts, sums=sums,
                 schedule=schedule, ckpt_dir=ctx.run.checkpoints("align"), checkpoint_every=al.checkpoint_every,
                 log=ctx.log)
    if ctx.acc.is_main_process:
        adapter_config, state = peft_payload(model)
        if method.shipped_adapter is not None:
            del model
            base = ctx.load_base()  # plain weights again: the phase-1 part ships as LoRA, not merged
            adapter_config, state = compose(base.model, ctx.run.adapter(method.shipped_adapter), adapter_config, state)
        adapter_config["base_model_name_or_path"] = base.hub_id
        write_run_bundle(ctx, base, adapter_config, state, {**summary, "layers": layers}, losses, phase3_layers)
    ctx.acc.wait_for_everyone()
    return losses


def compose(base_model: torch.nn.Module, phase1_dir: Path, phase3_config: dict, phase3_state: dict
            ) -> tuple[dict, dict]:
    """One LoRA over the plain base equal to phase-1 adapter + phase-3 LoRA: ranks concatenated,
    each part's own scaling folded into its A rows, zero rows where a part does not reach a module
    (the serving runtime's exact blend, `rahf_serve.blend`)."""
    from peft import LoraConfig

    model = PeftModel.from_pretrained(base_model, str(phase1_dir), adapter_name=PHASE1_PART)
    fields = {k: v for k, v in phase3_config.items() if k in LoraConfig.__dataclass_fields__}
    model.add_adapter(PHASE3_PART, LoraConfig(**fields))
    missing = set_peft_model_state_dict(model, phase3_state, adapter_name=PHASE3_PART)
    if getattr(missing, "unexpected_keys", None):
        raise RuntimeError(f"phase-3 weights did not fit: {missing.unexpected_keys[:3]}")
    build_blend(model, blend_key([(PHASE1_PART, 1.0), (PHASE3_PART, 1.0)]), SHIPPED)
    return peft_payload(model, SHIPPED)


def _lora_record(lora: LoraSettings, layers: list[int] | None) -> dict[str, Any]:
    return {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.target_modules), "layers_to_transform": layers}


def _data_record(ctx: Context) -> dict[str, Any]:
    mix = ctx.phase1_mix
    return {**ctx.data.describe(), **({"phase1_mix": mix.describe()} if mix else {})}


def write_run_bundle(ctx: Context, base: BaseModel, adapter_config: dict, state: dict, summary: dict,
                     losses: list[float], phase3_layers: list[int], metrics: dict | None = None) -> Path:
    cfg, method = ctx.config, get_method(ctx.config.method)
    parts = {"phase3": _lora_record(cfg.align.lora, phase3_layers)}
    if method.shipped_adapter is not None:
        parts = {"phase1": {"adapter": method.shipped_adapter, **_lora_record(cfg.phase1.lora, None)}, **parts}
    lora = {"r": adapter_config["r"], "lora_alpha": adapter_config["lora_alpha"],
            "lora_dropout": adapter_config.get("lora_dropout", 0.0),
            "target_modules": sorted(adapter_config["target_modules"]),
            "layers_to_transform": adapter_config.get("layers_to_transform"), "parts": parts}
    manifest = new_manifest(
        name=ctx.out.resolve().name, base_id=base.hub_id, base_revision=base.revision,
        base_fingerprint=base.fingerprint, method=cfg.method, layers=summary["layers"], alpha=cfg.align.alpha,
        lora=lora, data=_data_record(ctx), steps={"phase1": method.phase1_steps(cfg, len(ctx.phase1_pairs())),
                                                    **({"phase1_stop_at": cfg.phase1.stop_at} if cfg.phase1.stop_at else {}),
                                                    "align": cfg.align.steps},
        metrics=metrics, base_note=base.source_note, command=ctx.command, composition=method.composition,
        vector_norms=summary["norms"], max_res_len=summary["max_res_len"], stimuli=len(summary["stimuli"]),
        final_align_loss=losses[-1] if losses else None, seed=cfg.seed,
        phase1_validation=validation_summary(ctx.run, cfg.phase1.min_separation),
    )
    return write_bundle(ctx.run.bundle, adapter_config=adapter_config, lora_state=state,
                        vectors=load_vectors(ctx.run), manifest=manifest)
