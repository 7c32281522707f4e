"""Phase-2 difference vectors against a direct computation: one unpadded sequence at a time,
through the full causal-LM forward with `output_hidden_states`, response positions found by hand."""

import json

import torch
from peft import PeftModel
from safetensors.torch import load_file

from rahf_serve.models import load_base
from training.config import load_config
from training.data import load_preferences
from training.encode import prompt_ids

from .conftest import DATA


def direct_states(model, tokenizer, pair, side, instruction, cfg, keep):
    """[layers 1..N, keep, hidden] for the first `keep` response tokens of the `side` reply."""
    prompt = prompt_ids(tokenizer, pair.chat(), cfg.data.max_prompt_tokens, instruction)
    reply = tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt + reply])
    with torch.no_grad():
        hs = list(model(input_ids=ids, output_hidden_states=True).hidden_states)
    # transformers' last entry is after the final norm; the bundle wants the block's output there
    hs[-1] = last_block_output(model, ids)
    return torch.stack([h[0, len(prompt):len(prompt) + keep] for h in hs[1:]])


def last_block_output(model, ids):
    captured = {}
    block = model.get_base_model().model.layers[-1]
    handle = block.register_forward_hook(lambda _m, _a, out: captured.setdefault("h", out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    out = captured["h"]
    return out[0] if isinstance(out, tuple) else out


def test_scit_differences_match_direct_computation(scit_run, tiny_model_dir):
    cfg = load_config(scit_run / "config.yaml")
    summary = json.loads((scit_run / "collect" / "summary.json").read_text())
    diffs = load_file(scit_run / "collect" / "diffs.safetensors")
    means = load_file(scit_run / "collect" / "vectors.safetensors")
    base = load_base(str(tiny_model_dir), device="cpu")
    model = PeftModel.from_pretrained(base.model, str(scit_run / "phase1" / "scit")).eval()
    pairs = load_preferences(str(DATA), "0:8").pairs
    layers = summary["layers"]
    total, tokens = 0, 0
    # SCIT: one stimulus per pair, its answer drawn at random (seeded); both answers occur here
    assert [i for i, _ in summary["stimuli"]] == list(range(len(pairs)))
    assert {side for _, side in summary["stimuli"]} == {"chosen", "rejected"}
    for i, side in summary["stimuli"]:
        pair = pairs[i]
        keep = diffs[f"ex.{i}"].shape[1]
        reply = len(base.tokenizer(getattr(pair, side), add_special_tokens=False)["input_ids"])
        assert keep == min(cfg.collect.max_res_len, reply + 1)  # + the end-of-turn token when not cut
        direct = (direct_states(model, base.tokenizer, pair, side, cfg.phase1.good_instruction, cfg, keep)
                  - direct_states(model, base.tokenizer, pair, side, cfg.phase1.bad_instruction, cfg, keep))
        assert direct.abs().max() > 0  # the instruction does change the response's states
        torch.testing.assert_close(diffs[f"ex.{i}"], direct[[layer - 1 for layer in layers]], atol=2e-4, rtol=1e-4)
        total = total + direct.sum(1)
        tokens += keep
    assert summary["tokens"] == tokens
    for layer in range(1, base.model.config.num_hidden_layers + 1):
        torch.testing.assert_close(means[f"layers.{layer}.mean_diff"], total[layer - 1] / tokens,
                                   atol=2e-5, rtol=1e-4)
        assert abs(summary["norms"][str(layer)] - float((total[layer - 1] / tokens).norm())) < 1e-4
