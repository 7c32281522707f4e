"""Phase 1: teach the model(s) the preference.

SCIT: one LoRA; each pair gives (p+, q, chosen) and (p-, q, rejected) for the LM loss, and
both responses under the mismatched instruction for a label-smoothed 2-way contrast between
length-normalised log-likelihoods: 4 sequences per pair.
DualLLMs: adapters "good" (SFT on chosen) and "bad" (SFT on REJECTED) on one base copy.
LoRRA (the paper's ablation): no phase 1; the phase directory only records that it was skipped.

With `phase1.val_rows`, a fixed validation slice is scored before, during and after training
(`validation.json`, and "val_step" records in metrics.jsonl): its `separation` (SCIT: how much
more likely each response is under its own instruction; Dual: how much more "good" prefers chosen
over rejected than "bad" does; nats per token) is what phase 2 checks before collecting.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from peft import get_peft_model

from .config import TrainConfig
from .context import Context, lora_config, only_trainable
from .data import Pair, load_preferences
from .encode import Encoded, encode
from .forward import per_token_logprob, response_logprob, response_logprob_kl
from .loop import Schedule, fit
from .losses import scit_contrastive
from .rundir import RunDir

PHASE = "phase1"
VALIDATION = "validation.json"  # RunDir.validation


class NotSeparated(ValueError):
    """Phase 1 did not separate preferred from dispreferred on its validation rows."""


def _enc(ctx: Context, tokenizer, pair: Pair, response: str, instruction: str | None = None) -> Encoded:
    d = ctx.config.data
    return encode(tokenizer, pair.chat(), response, max_prompt=d.max_prompt_tokens,
                  max_response=d.max_response_tokens, instruction=instruction)


def _quads(ctx: Context, tok, pairs: list[Pair]) -> list[tuple[Encoded, ...]]:
    """Per pair: chosen|p+, chosen|p-, rejected|p-, rejected|p+ (matching instruction first)."""
    good, bad = ctx.config.phase1.good_instruction, ctx.config.phase1.bad_instruction
    return [(_enc(ctx, tok, p, p.chosen, good), _enc(ctx, tok, p, p.chosen, bad),
             _enc(ctx, tok, p, p.rejected, bad), _enc(ctx, tok, p, p.rejected, good)) for p in pairs]


def _val_pairs(ctx: Context) -> list[Pair]:
    rows = ctx.config.phase1.val_rows
    return load_preferences(ctx.data.source, rows).pairs if rows else []


def skip(ctx: Context) -> dict[str, list[float]]:
    """LoRRA: phase 2 reads the plain base, so there is nothing to train; record that."""
    ctx.commit(PHASE, lambda tmp: (tmp / "losses.json").write_text(json.dumps({"skipped": ctx.config.method})))
    return {}


def _setup(ctx: Context, first: str):
    base = ctx.load_base()
    torch.manual_seed(ctx.config.seed)
    model = get_peft_model(base.model, lora_config(ctx.config.phase1.lora), adapter_name=first)
    return model, base.tokenizer


def _save(ctx: Context, model, names: list[str], losses: dict, history: list[dict]) -> None:
    def write(tmp: Path) -> None:
        for name in names:
            model.save_pretrained(tmp, selected_adapters=[name])
        (tmp / "losses.json").write_text(json.dumps(losses))
        if history:
            (tmp / VALIDATION).write_text(json.dumps({"rows": ctx.config.phase1.val_rows, "history": history},
                                                     indent=2))

    ctx.commit(PHASE, write)


def _snapshotter(ctx: Context, model, name: str) -> Callable[[int], None]:
    """Saves adapter `name` as it is now to `RunDir.snapshot(name, step)`, whole or not at all."""
    def save(step: int) -> None:
        final = ctx.run.snapshot(name, step)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            model.save_pretrained(tmp, selected_adapters=[name])
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp / name if name != "default" else tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return save


def train_scit(ctx: Context) -> dict[str, list[float]]:
    p1 = ctx.config.phase1
    if p1.kl_to_base:
        raise ValueError("phase1.kl_to_base applies to Dual's \"good\" adapter; SCIT has no term for it")
    model, tok = _setup(ctx, "scit")
    pad, pairs = tok.pad_token_id, ctx.phase1_pairs()
    quads = _quads(ctx, tok, pairs)
    val_quads = scit_val_quads(ctx, tok)
    history: list[dict] = []

    def counts(items: list[int]) -> dict[str, float]:
        return {"lm": sum(quads[i][0].response_len + quads[i][2].response_len for i in items),
                "contrast": 2.0 * len(items)}

    def sums(items: list[int]) -> dict[str, torch.Tensor]:
        ll, n = response_logprob(model, [e for i in items for e in quads[i]], pad)
        ll, norm = ll.view(-1, 4), (ll / n.clamp(min=1)).view(-1, 4)
        contrast = (scit_contrastive(norm[:, 0], norm[:, 1], p1.label_smoothing, p1.contrastive_scale)
                    + scit_contrastive(norm[:, 2], norm[:, 3], p1.label_smoothing, p1.contrastive_scale))
        return {"lm": -(ll[:, 0] + ll[:, 2]).sum(), "contrast": p1.contrastive_weight * contrast.sum()}

    def validate() -> dict:
        return scit_separation(model, val_quads, pad)

    only_trainable(model, "scit")
    losses = {"scit": fit(ctx.acc, model, name="phase1/scit", n_items=len(pairs), counts=counts, sums=sums,
                          schedule=schedule(ctx.config, p1.steps_for("scit", len(pairs)), p1.lr), log=ctx.log,
                          validate=validate if val_quads else None, validate_every=p1.val_every, history=history,
                          snapshot=_snapshotter(ctx, model, "scit"), snapshot_every=p1.snapshot_every,
                          ckpt_dir=ctx.run.checkpoints(PHASE) / "scit", checkpoint_every=p1.checkpoint_every,
                          stop_at=p1.stop_steps(["scit"])["scit"])}
    _save(ctx, model, ["scit"], losses, history)
    return losses


def train_dual(ctx: Context) -> dict[str, list[float]]:
    p1, names = ctx.config.phase1, ["good", "bad"]
    stops = p1.stop_steps(names)  # before any training: a misnamed adapter fails now
    model, tok = _setup(ctx, "good")
    torch.manual_seed(ctx.config.seed + 1)
    model.add_adapter("bad", lora_config(p1.lora))
    pad, pairs = tok.pad_token_id, ctx.phase1_pairs()
    val_sides = dual_val_sides(ctx, tok)
    losses: dict[str, list[float]] = {}
    history: list[dict] = []
    for name in names:
        # "bad" learns the REJECTED responses (the reference script trains it on chosen by a typo).
        side = [_enc(ctx, tok, p, p.chosen if name == "good" else p.rejected) for p in pairs]
        model.set_adapter(name)
        only_trainable(model, name)

        kl = p1.kl_to_base if name == "good" else 0.0

        def counts(items: list[int], side=side, kl=kl) -> dict[str, float]:
            n = float(sum(side[i].response_len for i in items))
            return {"lm": n, "kl": n} if kl else {"lm": n}

        def sums(items: list[int], side=side, kl=kl) -> dict[str, torch.Tensor]:
            if not kl:
                ll, _ = response_logprob(model, [side[i] for i in items], pad)
                return {"lm": -ll.sum()}
            ll, div, _ = response_logprob_kl(model, [side[i] for i in items], pad)
            return {"lm": -ll.sum(), "kl": kl * div.sum()}

        def validate(training=name) -> dict:
            # An adapter not trained yet has B = 0: it is the base, so the margin starts at 0.
            record = {"training": training, **dual_separation(model, val_sides, pad)}
            model.set_adapter(training)
            only_trainable(model, training)
            return record

        losses[name] = fit(ctx.acc, model, name=f"phase1/{name}", n_items=len(pairs), counts=counts,
                           sums=sums, schedule=schedule(ctx.config, p1.steps_for("dual", len(pairs)), p1.dual_lr),
                           log=ctx.log, validate=validate if val_sides else None, validate_every=p1.val_every,
                           history=history, snapshot=_snapshotter(ctx, model, name),
                           snapshot_every=p1.snapshot_every, ckpt_dir=ctx.run.checkpoints(PHASE) / name,
                           checkpoint_every=p1.checkpoint_every,
                           stop_at=stops[name])
    _save(ctx, model, names, losses, history)
    return losses


def scit_val_quads(ctx: Context, tokenizer) -> list[Encoded]:
    """The validation rows' four sequences per pair (`_quads`' order), flat."""
    return [e for q in _quads(ctx, tokenizer, _val_pairs(ctx)) for e in q]


def scit_separation(model, val_quads: list[Encoded], pad: int) -> dict[str, float]:
    """How much more likely each answer is under its own instruction than under the other (mean,
    nats per token), and how often chosen beats rejected under p+."""
    n = per_token_logprob(model, val_quads, pad).view(-1, 4)
    return {"separation": float(((n[:, 0] - n[:, 1]) + (n[:, 2] - n[:, 3])).mean() / 2),
            "accuracy": float((n[:, 0] > n[:, 3]).float().mean())}


def dual_val_sides(ctx: Context, tokenizer) -> list[Encoded]:
    """The validation rows' chosen and rejected answers, in that order per pair."""
    return [_enc(ctx, tokenizer, p, r) for p in _val_pairs(ctx) for r in (p.chosen, p.rejected)]


def dual_separation(model, val_sides: list[Encoded], pad: int) -> dict[str, float]:
    """How much more "good" prefers chosen over rejected than "bad" does (mean, nats per token),
    and how often "good" prefers chosen; leaves "bad" active."""
    gaps = {}
    for adapter in ("good", "bad"):
        model.set_adapter(adapter)
        n = per_token_logprob(model, val_sides, pad).view(-1, 2)
        gaps[adapter] = n[:, 0] - n[:, 1]
    return {"separation": float((gaps["good"] - gaps["bad"]).mean()),
            "accuracy": float((gaps["good"] > 0).float().mean())}


def snapshot_steps(run: RunDir, adapter: str) -> list[int]:
    """The steps at which `run` saved a snapshot of `adapter`, in order."""
    folder = run.snapshot(adapter, 0).parent
    return sorted(int(p.name.removeprefix("step-")) for p in folder.glob("step-*")) if folder.is_dir() else []


def validation_summary(run: RunDir, min_separation: float) -> dict | None:
    """Phase 1 on its validation rows: first and last record, and whether it separated
    (separation rose by at least `min_separation`). None when the run had no validation rows."""
    if not run.validation.is_file():
        return None
    saved = json.loads(run.validation.read_text())
    first, last = saved["history"][0], saved["history"][-1]
    return {"rows": saved["rows"], "first": first, "last": last, "min_separation": min_separation,
            "separated": last["separation"] - first["separation"] >= min_separation}


def check_separated(run: RunDir, min_separation: float) -> dict | None:
    """`validation_summary`, raising NotSeparated when phase 1 did not separate."""
    summary = validation_summary(run, min_separation)
    if summary is not None and not summary["separated"]:
        first, last = summary["first"], summary["last"]
        raise NotSeparated(
            f"phase 1 did not separate preferred from dispreferred on its validation rows: separation "
            f"{first['separation']:+.4f} -> {last['separation']:+.4f} nats/token (needs a rise of "
            f"{min_separation}); train phase 1 longer or at a higher rate, or pass --force to collect anyway")
    return summary


def schedule(cfg: TrainConfig, steps: int, lr: float) -> Schedule:
    """Phase 1's optimisation schedule (batch, warmup, decay, clipping) for `steps` steps at peak `lr`."""
    p1 = cfg.phase1
    return Schedule(steps=steps, batch_size=p1.batch_size, micro_batch_size=p1.micro_batch_size, lr=lr,
                    warmup_ratio=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
                    max_grad_norm=cfg.max_grad_norm, seed=cfg.seed)
