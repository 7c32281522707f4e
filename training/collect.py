"""Phase 2: activity patterns. Stimuli through the phase-1 model(s), hidden-state differences.

The method decides the stimuli and the two sides (training.methods): SCIT and LoRRA read one
model (the SCIT model, or the plain base) under p+ and p-, Dual reads "good" and "bad" on the same
input. l indexes `output_hidden_states` (1..num_layers, the output of block l-1; for
l = num_layers the residual stream before the final norm, unlike transformers' last entry).
Per-token differences at the collected layers (the target layers and collect.layers) feed phase
3; per-layer means over every response token (all layers) and their norms ship in the bundle as
steering vectors. Before any of that, phase 1 must have separated on its validation rows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rahf_serve.vectors import load_vectors as read_vectors
from rahf_serve.vectors import save_vectors

from .config import collected_layers
from .context import Context
from .encode import Encoded
from .methods import get_method
from .phase1 import check_separated
from .rundir import RunDir

PHASE = "collect"


def response_states(states: dict[int, torch.Tensor], row: int, example: Encoded) -> torch.Tensor:
    """[num_layers, response_len, hidden] for one row: layers 1..N, response positions only."""
    span = slice(example.response_start, example.response_start + example.response_len)
    return torch.stack([states[layer][row, span] for layer in sorted(states)]).float().cpu()


def run_collect(ctx: Context) -> dict:
    """Check phase 1 (unless forced, which is logged), compute on the main process (forward passes
    only), then every process continues."""
    p1 = ctx.config.phase1
    if ctx.force:
        try:
            check_separated(ctx.run, p1.min_separation)
        except ValueError as err:
            ctx.log({"phase": PHASE, "warning": f"--force: {err}"})
    else:
        check_separated(ctx.run, p1.min_separation)
    summary: dict = {}
    if ctx.acc.is_main_process:
        summary = _collect(ctx)
    ctx.acc.wait_for_everyone()
    return summary or json.loads(ctx.run.summary.read_text())


@torch.no_grad()
def _collect(ctx: Context) -> dict:
    cfg, method = ctx.config, get_method(ctx.config.method)
    base = ctx.load_base()
    num_layers = base.model.config.num_hidden_layers
    layers = collected_layers(cfg, num_layers)
    every = list(range(1, num_layers + 1))
    model = method.phase1_model(base.model, ctx.run)
    model.eval()
    stimuli = method.stimuli(ctx, base.tokenizer)
    pad = base.tokenizer.pad_token_id
    per_token: dict[str, torch.Tensor] = {}
    total = torch.zeros(num_layers, base.model.config.hidden_size, dtype=torch.float64)
    tokens = 0
    step = max(1, cfg.collect.batch_size // 2)
    for start in tqdm(range(0, len(stimuli), step), desc="collect", disable=not ctx.acc.is_main_process):
        chunk = stimuli[start:start + step]
        h_pos, h_neg = method.states(model, [s.pos for s in chunk], [s.neg for s in chunk], pad, every)
        for row, s in enumerate(chunk):
            diff = response_states(h_pos, row, s.pos) - response_states(h_neg, row, s.neg)  # [N, T, H]
            per_token[f"ex.{start + row}"] = diff[[layer - 1 for layer in layers]].contiguous()
            total += diff.sum(dim=1, dtype=torch.float64)
            tokens += diff.shape[1]
    means = (total / max(tokens, 1)).float()
    norms = {i: float(means[i - 1].norm()) for i in range(1, num_layers + 1)}
    max_res = min(cfg.data.max_response_tokens, cfg.collect.max_res_len or method.max_res_len)
    summary = {"layers": layers, "num_layers": num_layers, "max_res_len": max_res, "tokens": tokens,
               "examples": len(stimuli), "stimuli": [[s.pair, s.side] for s in stimuli], "norms": norms}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file

        save_file(per_token, tmp / ctx.run.diffs.name, metadata={"layers": ",".join(map(str, layers))})
        save_vectors(tmp / ctx.run.vectors.name, {i: means[i - 1] for i in range(1, num_layers + 1)})
        (tmp / ctx.run.summary.name).write_text(json.dumps(summary, indent=2))

    ctx.commit(PHASE, write, barrier=False)
    ctx.log({"phase": PHASE, "tokens": tokens, "norms": norms})
    return summary


def load_vectors(run: RunDir) -> dict[int, torch.Tensor]:
    return read_vectors(run.vectors)


def load_diffs(run: RunDir) -> dict[int, torch.Tensor]:
    """stimulus index -> [len(collected layers), tokens, hidden]"""
    from safetensors.torch import load_file

    return {int(k.split(".")[1]): v for k, v in load_file(run.diffs).items()}
