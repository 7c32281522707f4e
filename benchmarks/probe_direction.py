"""Is there a preference direction in the base at all, and does steering along it move the metric?

    python benchmarks/probe_direction.py [--fit-rows 0:200] [--val-rows 200:240] [--steer-layers 10,20,28] \\
        [--steer-fracs 0.05,0.15,0.4]

Training rows only (issue 7: the held-out rows 240-299 stay untouched). For every layer l, u_l is
the difference of means (chosen minus rejected, over the fit rows) of the base's hidden states
averaged over the positions that predict response tokens. (1) Read: the share of validation pairs
whose own chosen-minus-rejected state projects positively on u_l. (2) Control: preference
accuracy on the validation rows (the `rahf-train eval` metric) with frac x |mean state| x u_l/|u_l|
added to hidden_states[l]. This is the label-supervised upper reference for what RAHF's difference
vectors can do through phase 3: a direction that fails here will not help once distilled.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from rahf_serve.models import load_base
from rahf_serve.steering import steering
from training.config import load_config
from training.data import load_preferences
from training.encode import collate, encode
from training.evaluate import margins, scores

DATA = "../shared/data/ultrafeedback_demo_300.sharegpt.json"


@torch.no_grad()
def pooled_states(model, tokenizer, pairs, cfg) -> torch.Tensor:
    """[pairs, 2 (chosen, rejected), layers, hidden]: states averaged over response-predicting positions."""
    d, out = cfg.data, []
    for s in tqdm(range(0, len(pairs), 4), desc="states"):
        ex = [encode(tokenizer, p.chat(), r, max_prompt=d.max_prompt_tokens, max_response=d.max_response_tokens)
              for p in pairs[s:s + 4] for r in (p.chosen, p.rejected)]
        b = collate(ex, tokenizer.pad_token_id)
        hs = model(input_ids=b.input_ids, attention_mask=b.attention_mask, output_hidden_states=True).hidden_states
        mask = b.response_mask[:, 1:].float()  # position t predicts token t + 1
        states = torch.stack(hs[1:], 1)[:, :, :-1]
        out.append((states * mask[:, None, :, None]).sum(2) / mask.sum(1)[:, None, None])
    return torch.cat(out).view(-1, 2, *out[0].shape[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--config", default="smollm2-scit", help="config whose token cuts to use")
    ap.add_argument("--fit-rows", default="0:200")
    ap.add_argument("--val-rows", default="200:240")
    ap.add_argument("--steer-layers", default="10,20,28")
    ap.add_argument("--steer-fracs", default="0.05,0.15,0.4")
    args = ap.parse_args()
    cfg = load_config(args.config)
    base = load_base(args.base)
    model, tok = base.model.eval(), base.tokenizer
    fit, val = (load_preferences(args.data, r).pairs for r in (args.fit_rows, args.val_rows))
    fit_states, val_states = pooled_states(model, tok, fit, cfg), pooled_states(model, tok, val, cfg)
    u = (fit_states[:, 0] - fit_states[:, 1]).mean(0)  # [layers, hidden]
    scale = fit_states.norm(dim=-1).mean((0, 1))  # typical |pooled state| per layer
    diff = val_states[:, 0] - val_states[:, 1]
    read = [round(float(((diff[:, i] @ u[i]) > 0).float().mean()), 3) for i in range(u.shape[0])]
    print(json.dumps({"probe_accuracy_by_layer": dict(enumerate(read, start=1))}))
    result = {"base": scores(margins(model, tok, val, cfg, cfg.eval.batch_size)).as_dict(), "steered": []}
    print(json.dumps({"base": result["base"]}), flush=True)
    for layer in map(int, args.steer_layers.split(",")):
        for frac in map(float, args.steer_fracs.split(",")):
            delta = frac * scale[layer - 1] * u[layer - 1] / u[layer - 1].norm()
            with steering(model, {layer: delta[None]}):
                s = scores(margins(model, tok, val, cfg, cfg.eval.batch_size, f"layer {layer} x {frac}")).as_dict()
            result["steered"].append({"layer": layer, "frac": frac, **s})
            print(json.dumps(result["steered"][-1]), flush=True)


if __name__ == "__main__":
    main()
