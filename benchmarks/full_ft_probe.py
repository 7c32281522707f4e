"""Dual's "good" trained as the reference code trains it, every weight rather than a LoRA, for comparison on
validation rows with the LoRA phase 1 that `rahf-train` runs.

    python benchmarks/full_ft_probe.py --out runs/full-good --config smollm2-dual --rows 0:1207 \\
        --lr 2e-5 --steps 100 --snapshot-every 25
    python benchmarks/phase1_health.py runs/full-good/good@25 runs/full-good/good@50 ... \\
        --config smollm2-dual --val-rows 1207:1307 --health-prompts 48 --out docs/results/hh-val-round10

The reference's step 1 fine-tunes every weight of the model at 2e-5 (`code/bash/DUAL-step1.sh`); phase 1
here is a LoRA. This trains every weight of the block's Linear layers named by the config's
`phase1.lora.target_modules` (embeddings and norms stay frozen) on the chosen answers with the same loss,
data cuts and batch as `rahf-train phase1 --method dual`'s "good", and writes each snapshot as a PEFT LoRA
of full rank: the SVD of each weight's change, B = U S and A = V^T with scaling 1, which equals the
fine-tuned weights up to float rounding. So every scorer that takes an adapter folder (phase1_health.py,
`rahf-train eval`) scores it, and the plain base stays at hand for the health figures' base log-likelihood.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.models import load_base  # noqa: E402
from training import phase1  # noqa: E402
from training.config import load_config  # noqa: E402
from training.data import load_preferences  # noqa: E402
from training.encode import encode  # noqa: E402
from training.forward import response_logprob  # noqa: E402
from training.loop import fit  # noqa: E402


def lora_of_change(before: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with B A = after - before exactly (r = the change's full rank)."""
    u, s, vh = torch.linalg.svd((after - before).double(), full_matrices=False)
    return vh.float().contiguous(), (u * s).float().contiguous()


def targets_of(model: torch.nn.Module, names: list[str]) -> dict[str, torch.nn.Linear]:
    return {path: m for path, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in path and path.rsplit(".", 1)[-1] in names}


def save_as_lora(base_spec: str, changes: dict[str, tuple[torch.Tensor, torch.Tensor]], names: list[str],
                 out: Path) -> None:
    """Write `changes` (module path -> (A, B)) as one PEFT adapter folder, rank per module by `rank_pattern`."""
    ranks = {path: a.shape[0] for path, (a, _) in changes.items()}
    top = max(ranks.values())
    config = LoraConfig(r=top, lora_alpha=top, target_modules=names, lora_dropout=0.0, bias="none",
                        task_type="CAUSAL_LM", rank_pattern={p: r for p, r in ranks.items() if r != top},
                        alpha_pattern={p: r for p, r in ranks.items() if r != top})
    peft = get_peft_model(load_base(base_spec, device="cpu", dtype="float32").model, config)
    with torch.no_grad():
        for path, (a, b) in changes.items():
            module = peft.base_model.model.get_submodule(path)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    peft.save_pretrained(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--config", default="smollm2-dual", help="data cuts, batch and target modules")
    ap.add_argument("--data", default="../shared/data/hh_harmless/train.jsonl")
    ap.add_argument("--rows", default="0:1207")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--lr", type=float, default=2e-5, help="peak rate (the reference's full fine-tuning: 2e-5)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--snapshot-every", type=int, default=25)
    args = ap.parse_args()

    cfg = load_config(args.config)
    p1, d = cfg.phase1, cfg.data
    names = list(p1.lora.target_modules)
    base = load_base(args.base, device="cpu", dtype="float32")
    model, tok = base.model, base.tokenizer
    pairs = load_preferences(args.data, args.rows).pairs
    side = [encode(tok, p.chat(), p.chosen, max_prompt=d.max_prompt_tokens, max_response=d.max_response_tokens)
            for p in pairs]
    targets = targets_of(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in targets.values():
        m.weight.requires_grad_(True)
    before = {path: m.weight.detach().clone() for path, m in targets.items()}
    model.train()

    def counts(items: list[int]) -> dict[str, float]:
        return {"lm": float(sum(side[i].response_len for i in items))}

    def sums(items: list[int]) -> dict[str, torch.Tensor]:
        ll, _ = response_logprob(model, [side[i] for i in items], tok.pad_token_id)
        return {"lm": -ll.sum()}

    def snapshot(step: int) -> None:
        t0 = time.perf_counter()
        changes = {path: lora_of_change(before[path], m.weight.detach()) for path, m in targets.items()}
        save_as_lora(args.base, changes, names, args.out / f"good@{step}")
        print(f"snapshot good@{step}: {time.perf_counter() - t0:.0f} s", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "probe.json").write_text(json.dumps({**vars(args), "out": str(args.out), "target_modules": names,
                                                     "trainable": sum(m.weight.numel() for m in targets.values()),
                                                     "batch_size": p1.batch_size}, indent=2))
    t0 = time.perf_counter()
    losses = fit(Accelerator(), model, name="full/good", n_items=len(pairs), counts=counts, sums=sums,
                 schedule=phase1.schedule(cfg, args.steps, args.lr), snapshot=snapshot,
                 snapshot_every=args.snapshot_every,
                 ckpt_dir=args.out / "checkpoint", checkpoint_every=args.snapshot_every)
    (args.out / "losses.json").write_text(json.dumps({"good": losses, "seconds": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()
