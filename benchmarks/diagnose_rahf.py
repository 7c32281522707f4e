"""Cheap diagnostics of why RAHF phase 3 barely moves preference accuracy (issue 7).

    python benchmarks/diagnose_rahf.py RUN_DIR [--rows 200:240] [--steer 5,20] [--fixed-steps 12]

RUN_DIR is a finished `rahf-train` run (phase1/, collect/, config.yaml, run.json). Prints, on
training rows only: (1) per-token norms of the base hidden state, of v and of alpha*v at the target
layers; (2) preference accuracy / mean margin (chosen vs rejected, per-token log-likelihood, no
instruction unless stated) of the base, the phase-1 model(s), the phase-1 model under p+ (SCIT),
and the base steered by c * mean_diff at the target layers; (3) phase-3 loss on one fixed batch.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model

from rahf_serve.models import load_base
from training.align import align_examples, alignment_sums
from training.collect import load_diffs, load_vectors
from training.config import load_config
from training.context import lora_config, only_trainable
from training.data import load_preferences
from training.encode import encode
from training.forward import block_outputs, response_logprob


@torch.no_grad()
def margin(model, tok, pairs, cfg, instruction=None, bs=8):
    d, out = cfg.data, []
    for s in range(0, len(pairs), bs // 2):
        ex = [encode(tok, p.chat(), r, max_prompt=d.max_prompt_tokens, max_response=d.max_response_tokens,
                     instruction=instruction) for p in pairs[s:s + bs // 2] for r in (p.chosen, p.rejected)]
        ll, n = response_logprob(model, ex, tok.pad_token_id)
        pt = (ll / n.clamp(min=1)).view(-1, 2)
        out.append(pt[:, 0] - pt[:, 1])
    m = torch.cat(out)
    return {"accuracy": round(float((m > 0).float().mean()), 3), "margin": round(float(m.mean()), 4)}


def steer_hooks(model, vectors, layers, coeff):
    decoder = (model.get_base_model() if hasattr(model, "get_base_model") else model).get_decoder()
    hs = []
    for layer in layers:
        vec = vectors[layer] * coeff

        def hook(_m, _a, out, vec=vec):
            if isinstance(out, tuple):
                return (out[0] + vec.to(out[0].dtype),) + tuple(out[1:])
            return out + vec.to(out.dtype)
        hs.append(decoder.layers[layer - 1].register_forward_hook(hook))
    return hs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--rows", default="200:240")
    ap.add_argument("--steer", default="5,20")
    ap.add_argument("--fixed-steps", type=int, default=12)
    ap.add_argument("--fixed-lr", type=float, default=1e-3)
    ap.add_argument("--skip-norms", action="store_true")
    ap.add_argument("--skip-base", action="store_true")
    a = ap.parse_args()
    run = json.loads((a.run / "run.json").read_text())
    cfg = load_config(a.run / "config.yaml")
    summary = json.loads((a.run / "collect" / "summary.json").read_text())
    layers, alpha = summary["layers"], cfg.align.alpha
    lo, hi = map(int, a.rows.split(":"))
    data = load_preferences(run["data"], a.rows)
    res = {"rows": a.rows, "layers": layers, "alpha": alpha}
    t0 = time.time()
    base = load_base(run["base"])
    tok, model = base.tokenizer, base.model
    # (1) norms on the collect pairs lo:hi (diff index = row index within the training range)
    train = load_preferences(run["data"], run["rows"])
    diffs = {} if a.skip_norms and not a.fixed_steps else load_diffs(a.run)

    class C:  # align_examples needs ctx.data / ctx.config
        pass
    ctx = C()
    ctx.config, ctx.data = cfg, train
    idx = [i for i in range(lo, hi) if i in diffs][:16]
    exs = align_examples(ctx, tok, diffs) if diffs else []
    norms = {}
    with torch.no_grad():
        for layer_i, layer in enumerate([] if a.skip_norms else layers):
            h_all, v_all = [], []
            for s in range(0, len(idx), 8):
                chunk = idx[s:s + 8]
                h = block_outputs(model, [exs[i] for i in chunk], tok.pad_token_id, [layer])[layer]
                for r, i in enumerate(chunk):
                    e = exs[i]
                    h_all.append(h[r, e.response_start:e.response_start + e.response_len].norm(dim=-1))
                    v_all.append(diffs[i][layer_i].norm(dim=-1))
            hn, vn = torch.cat(h_all).mean().item(), torch.cat(v_all).mean().item()
            norms[layer] = {"h": round(hn, 2), "v_token": round(vn, 3), "alpha_v/h": round(alpha * vn / hn, 3),
                            "mean_diff": round(summary["norms"][str(layer)], 3)}
    res["norms"] = norms
    print(json.dumps({"norms": norms}, indent=1), flush=True)
    # (2) margins
    pairs = data.pairs
    if not a.skip_base:
        res["base"] = margin(model, tok, pairs, cfg)
        print("base", res["base"], round(time.time() - t0), flush=True)
    vectors = load_vectors(a.run)
    for c in [float(x) for x in a.steer.split(",") if x]:
        hs = steer_hooks(model, vectors, layers, c)
        res[f"base_steer_{c:g}"] = margin(model, tok, pairs, cfg)
        for h in hs:
            h.remove()
        print(f"steer {c:g}", res[f"base_steer_{c:g}"], round(time.time() - t0), flush=True)
    names = ["scit"] if cfg.method == "scit" else ["good", "bad"]
    if (a.run / "phase1").is_dir():
        pm = PeftModel.from_pretrained(model, str(a.run / "phase1" / names[0]), adapter_name=names[0])
        for n in names[1:]:
            pm.load_adapter(str(a.run / "phase1" / n), adapter_name=n)
        pm.eval()
        for n in names:
            pm.set_adapter(n)
            res[f"phase1_{n}"] = margin(pm, tok, pairs, cfg)
            print(n, res[f"phase1_{n}"], round(time.time() - t0), flush=True)
        if cfg.method == "scit":
            res["phase1_scit_p+"] = margin(pm, tok, pairs, cfg, cfg.phase1.good_instruction)
            print("scit p+", res["phase1_scit_p+"], round(time.time() - t0), flush=True)
        model = pm.unload() if hasattr(pm, "unload") else pm.get_base_model()
    # (3) phase-3 loss on one fixed batch of 4 examples
    if a.fixed_steps:
        torch.manual_seed(0)
        pm = get_peft_model(model, lora_config(cfg.align.lora, list(range(max(layers)))))
        only_trainable(pm, "default")
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=a.fixed_lr)
        batch = idx[:4]
        n = len(layers) * sum(exs[i].response_len for i in batch)
        curve = []
        for _ in range(a.fixed_steps):
            loss = alignment_sums(pm, [exs[i] for i in batch], [diffs[i] for i in batch], layers, alpha,
                                  tok.pad_token_id) / n
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(round(loss.item(), 3))
        res["fixed_batch_loss"] = {"lr": a.fixed_lr, "curve": curve}
        print("fixed batch", curve, round(time.time() - t0), flush=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
