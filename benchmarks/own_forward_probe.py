"""Probe: how close a plain-PyTorch single-token llama decode gets to the weight-streaming floor.

    OMP_NUM_THREADS=1 python benchmarks/own_forward_probe.py

Not used by the engine: it measures what a decode forward of our own could reach before one is
built. On the real default model, in one process, in rounds of 10 decode steps at 64+ tokens of
context: the floor (every Linear's GEMV for one token, back to back), a forward written here (q/k/v
and gate/up weights concatenated so each block makes four GEMVs, `F.rms_norm`, rotary from a
precomputed table, a preallocated KV cache, SDPA with grouped heads), and transformers' own forward
with a DynamicCache. It first checks that its logits equal transformers' (to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.models import load_base  # noqa: E402

CONTEXT = 64


class PlainDecoder:
    """A single-token llama decode over the model's own weights, fused where the weights allow."""

    def __init__(self, model: torch.nn.Module, max_len: int) -> None:
        cfg = model.config
        self.hidden, self.heads, self.kv_heads = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = self.hidden // self.heads
        self.inter, self.eps = cfg.intermediate_size, cfg.rms_norm_eps
        self.blocks = []
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.blocks.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                                attn.o_proj.weight, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
                                mlp.down_proj.weight))
        self.embed, self.norm, self.head = model.model.embed_tokens.weight, model.model.norm.weight, model.lm_head.weight
        shape = (len(self.blocks), 1, self.kv_heads, max_len, self.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        angles = torch.outer(torch.arange(max_len).float(), model.model.rotary_emb.inv_freq.float())
        self.cos, self.sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def _rope(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        half = self.head_dim // 2
        return x * self.cos[pos] + torch.cat((-x[..., half:], x[..., :half]), -1) * self.sin[pos]

    @torch.inference_mode()
    def step(self, token: int, pos: int) -> torch.Tensor:
        hidden, q_end, k_end = self.hidden, self.hidden, self.hidden + self.kv_heads * self.head_dim
        h = self.embed[token].view(1, hidden)
        for i, (ln1, ln2, qkv_w, o_w, gu_w, down_w) in enumerate(self.blocks):
            qkv = F.linear(F.rms_norm(h, (hidden,), ln1, self.eps), qkv_w)
            q = self._rope(qkv[:, :q_end].view(self.heads, 1, self.head_dim), pos)
            k = self._rope(qkv[:, q_end:k_end].view(self.kv_heads, 1, self.head_dim), pos)
            self.keys[i, 0, :, pos] = k[:, 0]
            self.values[i, 0, :, pos] = qkv[:, k_end:].view(self.kv_heads, self.head_dim)
            o = F.scaled_dot_product_attention(q[None], self.keys[i, :, :, :pos + 1], self.values[i, :, :, :pos + 1],
                                               enable_gqa=True)
            h = h + F.linear(o.reshape(1, hidden), o_w)
            gu = F.linear(F.rms_norm(h, (hidden,), ln2, self.eps), gu_w)
            h = h + F.linear(F.silu(gu[:, :self.inter]) * gu[:, self.inter:], down_w)
        return F.linear(F.rms_norm(h, (hidden,), self.norm, self.eps), self.head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    model = load_base("smollm2-135m-instruct", device="cpu", dtype="float32").model.eval()
    n, rounds = args.steps, args.rounds
    plain = PlainDecoder(model, CONTEXT + n * rounds + 8)
    prompt = [5, 9, 11, 13]
    with torch.inference_mode():
        ref = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        for pos, token in enumerate(prompt):
            out = plain.step(token, pos)
    print(f"max |plain - transformers| over the logits: {(out[0] - ref).abs().max().item():.1e}")

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, 1, m.in_features) for m in linears]

    @torch.inference_mode()
    def floor() -> float:
        start = time.perf_counter()
        for _ in range(n):
            for m, x in zip(linears, inputs, strict=True):
                F.linear(x, m.weight)
        return (time.perf_counter() - start) / n

    at = [CONTEXT]

    def own() -> float:
        start = time.perf_counter()
        for _ in range(n):
            plain.step(7, at[0])
            at[0] += 1
        return (time.perf_counter() - start) / n

    @torch.inference_mode()
    def hf() -> float:
        cache = DynamicCache(config=model.config)
        model(input_ids=torch.tensor([[5] * CONTEXT]), cache=cache, use_cache=True)
        start = time.perf_counter()
        for _ in range(n):
            model(input_ids=torch.tensor([[7]]), cache=cache, use_cache=True)
        return (time.perf_counter() - start) / n

    for pos in range(CONTEXT):
        plain.step(5, pos)
    times: dict[str, list[float]] = {"floor": [], "plain forward": [], "transformers forward": []}
    for _ in range(rounds):
        for name, fn in zip(times, (floor, own, hf), strict=True):
            times[name].append(fn())
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# {torch.get_num_threads()} thread(s), medians of {rounds} rounds x {n} steps")
    for name, t in med.items():
        print(f"{name:22s} {t * 1e3:6.1f} ms a token   {med['floor'] / t:.2f}x the floor's speed")


if __name__ == "__main__":
    main()
