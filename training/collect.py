"""Phase 2: activity patterns. Stimulus pairs through the phase-1 model(s), hidden-state differences.

SCIT: v_l = H_l(p+ q r) - H_l(p- q r) through the SCIT model; Dual: v_l = H_l^good(q r) - H_l^bad(q r);
LoRRA (no phase 1): v_l = H_l(p+ q r) - H_l(p- q r) through the plain base.
r is the chosen response, the same tokens on both sides; only its first `max_res_len` tokens count.
l indexes `output_hidden_states` (1..num_layers, the output of block l-1; for l = num_layers the
residual stream before the final norm, unlike transformers' last entry). Per-token differences at
the collected layers (the target layers and collect.layers) feed phase 3; per-layer means over
every response token (all layers) and their norms ship in the bundle as steering vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .config import collected_layers
from .context import Context
from .encode import Encoded, encode
from .forward import block_outputs
from .phase1 import adapter_dir, adapter_names

PHASE = "collect"
DIFFS = "diffs.safetensors"
VECTORS = "vectors.safetensors"
SUMMARY = "summary.json"


def response_states(states: dict[int, torch.Tensor], row: int, example: Encoded) -> torch.Tensor:
    """[num_layers, response_len, hidden] for one row: layers 1..N, response positions only."""
    span = slice(example.response_start, example.response_start + example.response_len)
    return torch.stack([states[layer][row, span] for layer in sorted(states)]).float().cpu()


def stimuli(ctx: Context, tokenizer) -> list[tuple[Encoded, Encoded]]:
    """The two sides of every stimulus pair: same response tokens, differing only in instruction."""
    cfg = ctx.config
    d, max_res = cfg.data, min(cfg.data.max_response_tokens, cfg.max_res_len())
    p1 = cfg.phase1
    out = []
    for p in ctx.data.pairs:
        def side(instruction: str | None, p=p) -> Encoded:
            return encode(tokenizer, p.chat(), p.chosen, max_prompt=d.max_prompt_tokens, max_response=max_res,
                          instruction=instruction)
        out.append((side(None), side(None)) if cfg.method == "dual"
                   else (side(p1.good_instruction), side(p1.bad_instruction)))
    return out


def run_collect(ctx: Context) -> dict:
    """Compute on the main process (forward passes only), then every process continues."""
    summary: dict = {}
    if ctx.acc.is_main_process:
        summary = _collect(ctx)
    ctx.acc.wait_for_everyone()
    return summary or json.loads((ctx.out / PHASE / SUMMARY).read_text())


@torch.no_grad()
def _collect(ctx: Context) -> dict:
    cfg = ctx.config
    base = ctx.load_base()
    num_layers = base.model.config.num_hidden_layers
    layers = collected_layers(cfg, num_layers)
    every = list(range(1, num_layers + 1))
    names = adapter_names(cfg.method)
    model = base.model
    if names:  # LoRRA has no phase-1 adapter: the plain base
        model = PeftModel.from_pretrained(base.model, str(adapter_dir(ctx, names[0])), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(adapter_dir(ctx, name)), adapter_name=name)
    model.eval()
    pairs = stimuli(ctx, base.tokenizer)
    pad = base.tokenizer.pad_token_id
    per_token: dict[str, torch.Tensor] = {}
    total = torch.zeros(num_layers, base.model.config.hidden_size, dtype=torch.float64)
    tokens = 0
    step = max(1, cfg.collect.batch_size // 2)
    for start in tqdm(range(0, len(pairs), step), desc="collect", disable=not ctx.acc.is_main_process):
        chunk = pairs[start:start + step]
        pos, neg = [a for a, _ in chunk], [b for _, b in chunk]
        if cfg.method != "dual":
            h_pos, h_neg = block_outputs(model, pos, pad, every), block_outputs(model, neg, pad, every)
        else:
            model.set_adapter("good")
            h_pos = block_outputs(model, pos, pad, every)
            model.set_adapter("bad")
            h_neg = block_outputs(model, neg, pad, every)
        for row, (a, b) in enumerate(chunk):
            diff = response_states(h_pos, row, a) - response_states(h_neg, row, b)  # [N, T, H]
            per_token[f"ex.{start + row}"] = diff[[layer - 1 for layer in layers]].contiguous()
            total += diff.sum(dim=1, dtype=torch.float64)
            tokens += diff.shape[1]
    means = (total / max(tokens, 1)).float()
    norms = {i: float(means[i - 1].norm()) for i in range(1, num_layers + 1)}
    summary = {"layers": layers, "num_layers": num_layers, "max_res_len": cfg.max_res_len(), "tokens": tokens,
               "examples": len(pairs), "norms": norms}

    def write(tmp: Path) -> None:
        save_file(per_token, tmp / DIFFS, metadata={"layers": ",".join(map(str, layers))})
        save_file({f"layers.{i}.mean_diff": means[i - 1].contiguous() for i in range(1, num_layers + 1)},
                  tmp / VECTORS)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2))

    ctx.commit(PHASE, write, barrier=False)
    ctx.log({"phase": PHASE, "tokens": tokens, "norms": norms})
    return summary


def load_vectors(run_dir: Path) -> dict[int, torch.Tensor]:
    tensors = load_file(run_dir / PHASE / VECTORS)
    return {int(k.split(".")[1]): v for k, v in tensors.items()}


def load_diffs(run_dir: Path) -> dict[int, torch.Tensor]:
    """pair index -> [len(target layers), tokens, hidden]"""
    return {int(k.split(".")[1]): v for k, v in load_file(run_dir / PHASE / DIFFS).items()}
