"""How far bfloat16 LoRA factors (`rahf-serve --lora-dtype bfloat16`) move a float32 model's next-token
distributions, beside how far the adapter itself moves them from the base.

    python benchmarks/lora_dtype_fidelity.py                 # the shipped bundles on SmolLM2-135M, 64 dialogues
    python benchmarks/lora_dtype_fidelity.py --rows 200 --max-tokens 384

The dialogues are the chosen side of the last `--rows` pairs of HH-RLHF harmless train.jsonl (never the test
set), each cut to `--max-tokens` tokens. One forward per dialogue with each adapter in float32 slots, the same
adapter in bfloat16 slots, and the base alone; at every position: KL(adapter in float32 || in bfloat16), KL(adapter
|| base) for scale, and whether the most likely next token is the same. The slots run torch's products here
(whole-sequence forwards); the row kernel reads the same rounded factors.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.bundle import read_bundle  # noqa: E402
from rahf_serve.lora_slots import LoraSlots, read_lora  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"dual": ROOT / "adapters" / "smollm2-135m-rahf-dual", "scit": ROOT / "adapters" / "smollm2-135m-rahf-scit"}
DATA = ROOT.parent / "shared" / "data" / "hh_harmless" / "train.jsonl"


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position, in nats, from log-probabilities [positions, vocab]."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--data", type=Path, default=DATA)
    args = ap.parse_args()
    base = load_base("smollm2-135m-instruct", device="cpu", dtype="float32")
    lines = args.data.read_text().splitlines()[-args.rows:]
    texts = [json.loads(line)["chosen"].strip() for line in lines]
    slots = {dtype: LoraSlots(copy.deepcopy(base.model).eval(), max_loras=2, max_rank=16, kernel=False, dtype=dtype)
             for dtype in (torch.float32, torch.bfloat16)}
    for name, path in SHIPPED.items():
        weights = read_lora(read_bundle(path), name)
        for s in slots.values():
            s.load_weights(name, weights)
    plain = base.model.eval()
    print(f"# SmolLM2-135M float32, the shipped bundles; {len(texts)} HH harmless train dialogues (chosen), "
          f"<= {args.max_tokens} tokens; torch {torch.__version__}")
    print(f"{'adapter':>8} {'positions':>9} {'KL f32||bf16 mean':>17} {'p99':>9} {'max':>9} "
          f"{'argmax differs':>14} {'KL adapter||base mean':>21} {'argmax differs from base':>24}")
    with torch.inference_mode():
        for name in SHIPPED:
            rounding, shift, flips, moved, count = [], [], 0, 0, 0
            for text in texts:
                ids = base.tokenizer(text, return_tensors="pt").input_ids[:, :args.max_tokens]
                logs = {}
                for dtype, s in slots.items():
                    s.set_rows([s.slot_of(name)])
                    logs[dtype] = torch.log_softmax(s.model(ids).logits[0].double(), -1)
                logs["base"] = torch.log_softmax(plain(ids).logits[0].double(), -1)
                full, half = logs[torch.float32], logs[torch.bfloat16]
                rounding.append(kl(full, half))
                shift.append(kl(full, logs["base"]))
                flips += int((full.argmax(-1) != half.argmax(-1)).sum())
                moved += int((full.argmax(-1) != logs["base"].argmax(-1)).sum())
                count += ids.shape[1]
            r, m = torch.cat(rounding), torch.cat(shift)
            print(f"{name:>8} {count:>9} {r.mean():>17.2e} {r.quantile(0.99):>9.2e} {r.max():>9.2e} "
                  f"{flips / count:>14.4%} {m.mean():>21.2e} {moved / count:>24.2%}")


if __name__ == "__main__":
    main()
