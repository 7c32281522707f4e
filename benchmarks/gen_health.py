"""Generation health of base vs adapter bundles: distinct-2 and mean length of greedy answers.

    python benchmarks/gen_health.py --adapter scit=adapters/smollm2-135m-rahf-scit \\
        --adapter dual=adapters/smollm2-135m-rahf-dual --out docs/results/gen_health.json

The prompt set is fixed: the last user turn of every `--every`-th row of `--rows` of the data
(default rows 240:300, every 5th: 12 prompts), rendered with the base's chat template, greedy,
`--max-new-tokens` 64; the figures (distinct-2, mean length, base log-lik) are defined in
`training/health.py`. The base and every adapter share one copy of the weights (PEFT adapters, the
base with the adapter disabled).
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path

from rahf_serve.bundle import attach, read_bundle
from rahf_serve.models import load_base
from training.data import load_preferences
from training.encode import prompt_ids
from training.health import measure

DATA = "../shared/data/ultrafeedback_demo_300.sharegpt.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--rows", default="240:300")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--max-prompt-tokens", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    base = load_base(a.base)
    tok = base.tokenizer
    pairs = load_preferences(a.data, a.rows).pairs[::a.every]
    prompts = [prompt_ids(tok, p.chat(), a.max_prompt_tokens) for p in pairs]
    model = base.model
    names = []
    for spec in a.adapter:
        name, _, path = spec.partition("=")
        model = attach(model, read_bundle(Path(path)), name, base.fingerprint, base.name)
        names.append(name)
    model.eval()
    result = {"base": a.base, "data": a.data, "rows": a.rows, "every": a.every, "prompts": len(prompts),
              "max_new_tokens": a.max_new_tokens, "models": {}}
    for name in ["base", *names]:
        t0 = time.perf_counter()
        with model.disable_adapter() if name == "base" and names else nullcontext():
            if name != "base":
                model.set_adapter(name)
            m = measure(model, tok, prompts, a.max_new_tokens, a.batch)
        result["models"][name] = {**m, "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name}: distinct-2 {m['distinct2']:.4f}, mean length {m['mean_length']:.1f} tokens, "
              f"base log-lik {m['base_loglik']:+.3f} ({result['models'][name]['seconds']} s)", flush=True)
    result["prompt_texts"] = [p.messages[-1][1] for p in pairs]
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
