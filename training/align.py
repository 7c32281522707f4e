"""Phase 3: a fresh LoRA on the plain base whose hidden states at the target layers move to
H_base + alpha * v, v the per-token differences from phase 2 (masked mean L2 over response tokens).

The base targets come online from a frozen pass through the same weights with the adapter
disabled, so one copy of the base serves both passes. The LoRA wraps blocks 0..max(target)-1:
hidden_states[l] is the output of block l-1, so later blocks cannot move any target.
The result is written as the run's bundle, one standard PEFT LoRA over the plain base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model

from rahf_serve.bundle import new_manifest, peft_payload, write_bundle

from .collect import PHASE as COLLECT
from .collect import SUMMARY, load_diffs, load_vectors
from .config import target_layers
from .context import Context, lora_config, only_trainable
from .encode import Encoded, collate, encode
from .forward import block_outputs
from .loop import Schedule, fit
from .losses import alignment_distance

PHASE = "bundle"
CKPT = "checkpoints/align"

COMPOSITION = {
    "scit": "phase 3 trained against the plain base, inputs without any instruction: "
            "target = H_base(q r) + alpha * (H_scit(p+ q r) - H_scit(p- q r))",
    "dual": "phase 3 trained against the plain base (the good adapter is not folded in): "
            "target = H_base(q r) + alpha * (H_good(q r) - H_bad(q r))",
    "lorra": "LoRRA ablation (no phase 1), phase 3 trained against the plain base: "
             "target = H_base(q r) + alpha * (H_base(p+ q r) - H_base(p- q r))",
}


def align_examples(ctx: Context, tokenizer, diffs: dict[int, torch.Tensor]) -> list[Encoded]:
    """The plain (q, r) inputs, each cut to the response tokens phase 2 kept differences for."""
    d = ctx.config.data
    out = []
    for i, pair in enumerate(ctx.data.pairs):
        keep = diffs[i].shape[1]
        enc = encode(tokenizer, pair.chat(), pair.chosen, max_prompt=d.max_prompt_tokens, max_response=keep)
        if enc.response_len != keep:
            raise RuntimeError(f"pair {i}: {enc.response_len} response tokens but phase 2 kept {keep}; "
                               "was the data or tokenizer changed since collect?")
        out.append(enc)
    return out


def alignment_sums(model, examples: list[Encoded], diffs: list[torch.Tensor], layers: list[int],
                   alpha: float, pad_id: int) -> torch.Tensor:
    """Sum over target layers and response tokens of ||H_lora - (H_base + alpha * v)||."""
    with torch.no_grad(), model.disable_adapter():
        base = block_outputs(model, examples, pad_id, layers)
    tuned = block_outputs(model, examples, pad_id, layers)
    device = tuned[layers[0]].device
    mask = collate(examples, pad_id).response_mask.to(device, tuned[layers[0]].dtype)
    total = torch.zeros((), device=device)
    for li, layer in enumerate(layers):
        v = torch.zeros_like(base[layer])
        for row, e in enumerate(examples):
            v[row, e.response_start:e.response_start + e.response_len] = diffs[row][li].to(device, v.dtype)
        total = total + alignment_distance(tuned[layer], base[layer] + alpha * v, mask)
    return total


def run_align(ctx: Context) -> list[float]:
    cfg, al = ctx.config, ctx.config.align
    summary = json.loads((ctx.out / COLLECT / SUMMARY).read_text())
    layers = target_layers(cfg, summary["num_layers"])
    missing = sorted(set(layers) - set(summary["layers"]))
    if missing:
        raise ValueError(f"align.target_layers {missing} were not collected (phase 2 kept {summary['layers']}); "
                         "add them to collect.layers and run collect again")
    keep = [summary["layers"].index(layer) for layer in layers]
    diffs = {i: d[keep] for i, d in load_diffs(ctx.out).items()}
    base = ctx.load_base()
    examples = align_examples(ctx, base.tokenizer, diffs)
    pad = base.tokenizer.pad_token_id
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base.model, lora_config(al.lora, list(range(max(layers)))))
    only_trainable(model, "default")

    def counts(items: list[int]) -> dict[str, float]:
        return {"align": float(len(layers) * sum(examples[i].response_len for i in items))}

    def sums(items: list[int]) -> dict[str, torch.Tensor]:
        return {"align": alignment_sums(model, [examples[i] for i in items], [diffs[i] for i in items],
                                        layers, al.alpha, pad)}

    schedule = Schedule(steps=al.steps, batch_size=al.batch_size, micro_batch_size=al.micro_batch_size, lr=al.lr,
                        warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                        max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
    losses = fit(ctx.acc, model, name="align", n_items=len(examples), counts=counts, sums=sums,
                 schedule=schedule, ckpt_dir=ctx.out / CKPT, checkpoint_every=al.checkpoint_every, log=ctx.log)
    if ctx.acc.is_main_process:
        adapter_config, state = peft_payload(model)
        adapter_config["base_model_name_or_path"] = base.hub_id
        write_run_bundle(ctx, base, adapter_config, state, {**summary, "layers": layers}, losses)
    ctx.acc.wait_for_everyone()
    return losses


def write_run_bundle(ctx: Context, base, adapter_config: dict, state: dict, summary: dict,
                     losses: list[float], metrics: dict | None = None) -> Path:
    cfg = ctx.config
    lora = cfg.align.lora
    steps = {"phase1": {"scit": cfg.phase1.steps, "dual": cfg.phase1.dual_steps, "lorra": 0}[cfg.method],
             "align": cfg.align.steps}
    manifest = new_manifest(
        name=ctx.out.resolve().name, base_id=base.hub_id, base_revision=base.revision,
        base_fingerprint=base.fingerprint, method=cfg.method, layers=summary["layers"], alpha=cfg.align.alpha,
        lora={"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": list(lora.target_modules), "layers_to_transform": list(range(max(summary["layers"])))},
        data=ctx.data.describe(), steps=steps, metrics=metrics, base_note=base.source_note, command=ctx.command,
        composition=COMPOSITION[cfg.method], vector_norms=summary["norms"], max_res_len=summary["max_res_len"],
        final_align_loss=losses[-1] if losses else None, seed=cfg.seed,
    )
    return write_bundle(ctx.out / PHASE, adapter_config=adapter_config, lora_state=state,
                        vectors=load_vectors(ctx.out), manifest=manifest)
