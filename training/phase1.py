"""Phase 1: teach the model(s) the preference.

SCIT: one LoRA; each pair gives (p+, q, chosen) and (p-, q, rejected) for the LM loss, and
both responses under the mismatched instruction for a label-smoothed 2-way contrast between
length-normalised log-likelihoods: 4 sequences per pair.
DualLLMs: adapters "good" (SFT on chosen) and "bad" (SFT on REJECTED) on one base copy.
LoRRA (the paper's ablation): no phase 1; the phase directory only records that it was skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import get_peft_model

from .context import Context, lora_config, only_trainable
from .encode import Encoded, encode
from .forward import response_logprob
from .loop import Schedule, fit
from .losses import scit_contrastive

PHASE = "phase1"


def adapter_names(method: str) -> list[str]:
    return {"scit": ["scit"], "dual": ["good", "bad"], "lorra": []}[method]


def _enc(ctx: Context, tokenizer, pair, response: str, instruction: str | None = None) -> Encoded:
    d = ctx.config.data
    return encode(tokenizer, pair.chat(), response, max_prompt=d.max_prompt_tokens,
                  max_response=d.max_response_tokens, instruction=instruction)


def run_phase1(ctx: Context) -> dict[str, list[float]]:
    cfg, p1 = ctx.config, ctx.config.phase1
    if cfg.method == "lorra":  # phase 3 collects through the plain base: nothing to train here
        ctx.commit(PHASE, lambda tmp: (tmp / "losses.json").write_text(json.dumps({"skipped": "lorra"})))
        return {}
    base = ctx.load_base()
    tok, pad = base.tokenizer, base.tokenizer.pad_token_id
    pairs = ctx.data.pairs
    torch.manual_seed(cfg.seed)
    names = adapter_names(cfg.method)
    model = get_peft_model(base.model, lora_config(p1.lora), adapter_name=names[0])
    losses: dict[str, list[float]] = {}
    if cfg.method == "scit":
        good, bad = p1.good_instruction, p1.bad_instruction
        # Per pair: chosen|p+, chosen|p-, rejected|p-, rejected|p+ (matching instruction first).
        quads = [(_enc(ctx, tok, p, p.chosen, good), _enc(ctx, tok, p, p.chosen, bad),
                  _enc(ctx, tok, p, p.rejected, bad), _enc(ctx, tok, p, p.rejected, good)) for p in pairs]

        def counts(items: list[int]) -> dict[str, float]:
            return {"lm": sum(quads[i][0].response_len + quads[i][2].response_len for i in items),
                    "contrast": 2.0 * len(items)}

        def sums(items: list[int]) -> dict[str, torch.Tensor]:
            ll, n = response_logprob(model, [e for i in items for e in quads[i]], pad)
            ll, norm = ll.view(-1, 4), (ll / n.clamp(min=1)).view(-1, 4)
            contrast = (scit_contrastive(norm[:, 0], norm[:, 1], p1.label_smoothing, p1.contrastive_scale)
                        + scit_contrastive(norm[:, 2], norm[:, 3], p1.label_smoothing, p1.contrastive_scale))
            return {"lm": -(ll[:, 0] + ll[:, 2]).sum(), "contrast": p1.contrastive_weight * contrast.sum()}

        only_trainable(model, "scit")
        schedule = _schedule(ctx, p1.steps, p1.lr)
        losses["scit"] = fit(ctx.acc, model, name="phase1/scit", n_items=len(pairs), counts=counts, sums=sums,
                             schedule=schedule, log=ctx.log)
    else:
        torch.manual_seed(cfg.seed + 1)
        model.add_adapter("bad", lora_config(p1.lora))
        for name in names:
            # "bad" learns the REJECTED responses (the reference script trains it on chosen by a typo).
            side = [_enc(ctx, tok, p, p.chosen if name == "good" else p.rejected) for p in pairs]
            model.set_adapter(name)
            only_trainable(model, name)

            def counts(items: list[int], side=side) -> dict[str, float]:
                return {"lm": float(sum(side[i].response_len for i in items))}

            def sums(items: list[int], side=side) -> dict[str, torch.Tensor]:
                ll, _ = response_logprob(model, [side[i] for i in items], pad)
                return {"lm": -ll.sum()}

            losses[name] = fit(ctx.acc, model, name=f"phase1/{name}", n_items=len(pairs), counts=counts,
                               sums=sums, schedule=_schedule(ctx, p1.dual_steps, p1.dual_lr), log=ctx.log)

    def write(tmp: Path) -> None:
        for name in names:
            model.save_pretrained(tmp, selected_adapters=[name])
        (tmp / "losses.json").write_text(json.dumps(losses))

    ctx.commit(PHASE, write)
    return losses


def _schedule(ctx: Context, steps: int, lr: float) -> Schedule:
    cfg, p1 = ctx.config, ctx.config.phase1
    return Schedule(steps=steps, batch_size=p1.batch_size, micro_batch_size=p1.micro_batch_size, lr=lr,
                    warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                    max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)


def adapter_dir(ctx: Context, name: str) -> Path:
    # PEFT saves a non-"default" adapter under a subfolder named after it.
    return ctx.out / PHASE / name
