"""DPO baseline (TRL's DPOTrainer) on the same base, data rows and phase-3 LoRA size as the RAHF runs.

    pip install -e '.[baselines]'      # trl; leaves the installed torch/transformers as they are
    python benchmarks/dpo_baseline.py --out runs/dpo --rows 0:1207 --config smollm2-dual --steps 30 --batch-size 8
    rahf-train eval --adapter dpo=runs/dpo/adapter --data ../shared/data/hh_harmless/test.jsonl \\
        --config smollm2-dual --out runs/dpo/eval

The LoRA is the phase-3 LoRA of `--config` (r 8, lora_alpha 16, dropout 0.05, q_proj + v_proj);
prompts and responses are cut exactly as rahf-train cuts them (`--config`: prompt <= 96, response
<= 64 tokens, the prompt rendered with the base's chat template), so DPO sees the same tokens RAHF
does. The reference model is the base itself (the adapter disabled). The result, `OUT/adapter`, is
a plain PEFT folder that `rahf-train eval` and `rahf-serve --adapter` load.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig

from rahf_serve.models import load_base
from training.config import load_config
from training.data import load_preferences
from training.encode import prompt_ids

DATA = "../shared/data/hh_harmless/train.jsonl"


def cut(tok, text: str, n: int) -> str:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= n else tok.decode(ids[:n])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--rows", default="0:240")
    ap.add_argument("--config", default="smollm2-scit", help="rahf-train config whose sequence lengths to use")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora", choices=["phase1", "align"], default="align",
                    help="whose LoRA settings of --config to use: `phase1` matches the size of a shipped RAHF "
                         "bundle's phase-1 part (its config's phase1.lora), `align` its phase-3 part")
    a = ap.parse_args()
    from trl import DPOConfig, DPOTrainer  # optional: pip install -e '.[baselines]'

    cfg = load_config(a.config)
    base = load_base(a.base)
    tok = base.tokenizer
    pairs = load_preferences(a.data, a.rows).pairs
    eos = tok.eos_token or ""
    rows = []
    for p in pairs:
        prompt = tok.decode(prompt_ids(tok, p.chat(), cfg.data.max_prompt_tokens))
        rows.append({"prompt": prompt,
                     "chosen": cut(tok, p.chosen, cfg.data.max_response_tokens) + eos,
                     "rejected": cut(tok, p.rejected, cfg.data.max_response_tokens) + eos})
    lora = cfg.phase1.lora if a.lora == "phase1" else cfg.align.lora
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")
    args = DPOConfig(output_dir=str(a.out / "trainer"), max_steps=a.steps, learning_rate=a.lr, beta=a.beta,
                     per_device_train_batch_size=a.micro_batch_size,
                     gradient_accumulation_steps=max(1, a.batch_size // a.micro_batch_size),
                     lr_scheduler_type="linear", warmup_steps=max(1, round(0.1 * a.steps)), max_grad_norm=1.0, seed=a.seed,
                     max_length=cfg.data.max_prompt_tokens + cfg.data.max_response_tokens + 2,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                     bf16=False, fp16=False, dataloader_num_workers=0, gradient_checkpointing=False)
    base.model.requires_grad_(False)
    trainer = DPOTrainer(model=base.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tok, peft_config=peft_config)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    out = a.out / "adapter"
    trainer.model.save_pretrained(str(out))
    logs = [r for r in trainer.state.log_history if "loss" in r]
    (a.out / "dpo.json").write_text(json.dumps({
        "base": a.base, "data": a.data, "rows": a.rows, "pairs": len(rows), "steps": a.steps,
        "batch_size": a.batch_size, "lr": a.lr, "beta": a.beta, "lora": {"r": lora.r, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "target_modules": list(lora.target_modules)},
        "train_seconds": round(seconds, 1), "log": logs}, indent=2))
    print(f"DPO: {a.steps} steps x {a.batch_size} pairs in {seconds:.0f} s -> {out}", flush=True)


if __name__ == "__main__":
    main()
