"""The engine's own forward for llama-family bases: the same math as transformers' LlamaModel, in fewer operators.

A decode step on a small model is bound by operator overhead as much as by weights: transformers' llama
modules spend about 3,000 small operators a step around the Linear layers (measured in
benchmarks/own_forward_probe.py). This forward runs over the engine's packed step (`SlotStep`: every row's
new tokens in one sequence) with

- q/k/v and gate/up as one matrix each (the Linear modules keep views into them, so nothing is copied and
  every other user of the model sees the same weights), each module's LoRA slots added to its slice of
  the output;
- rotary angles from a table built once, indexed by each token's position;
- keys and values written straight into the `SlotCache`, attention through its per-row groups;
- steering added to the residual stream after a block, as `rahf_serve.steering` hooks would.

It returns the logits of each feeding row's last token and, when asked, the final hidden states (prompt
log-probabilities). Bases it does not cover (biases, q/k norms, rotary scalings that change with length)
keep transformers' forward: `packed_forward_for` says which and why.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from .kvcache import SlotCache, SlotStep
from .lora_slots import SlotLinear

log = logging.getLogger(__name__)

_ROPE_TYPES = ("default", "linear", "llama3")
"""Rotary types whose angles depend on the position alone (a table built once is exact)."""


def unsupported_reason(model: Any) -> str | None:
    """Why `PackedLlama` cannot run this model exactly, or None when it can."""
    config = model.config
    if getattr(config, "model_type", None) not in ("llama", "mistral"):
        return f"model type {getattr(config, 'model_type', None)!r} (llama and mistral only)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "Linear biases"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    inner = getattr(model, "model", None)
    rotary = getattr(inner, "rotary_emb", None)
    if rotary is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
        return "not a LlamaForCausalLM layout (model.layers, model.rotary_emb, lm_head)"
    if getattr(rotary, "rope_type", "default") not in _ROPE_TYPES:
        return f"rotary type {rotary.rope_type!r} (angles that change with the sequence length)"
    return None


def packed_forward_for(model: Any, max_len: int) -> PackedLlama | None:
    """The packed forward for `model`, or None (logged with the reason) when it keeps transformers'."""
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("engine forward: transformers' (the packed llama forward does not cover %s)", reason)
        return None
    return PackedLlama(model, max_len)


def _fuse(modules: list[torch.nn.Linear]) -> tuple[torch.Tensor, list[slice]]:
    """One [sum(out), in] matrix holding the modules' weights; each module's weight becomes a view of it."""
    fused = torch.cat([m.weight.detach() for m in modules])
    slices, at = [], 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight.data = fused[at:at + n]
        slices.append(slice(at, at + n))
        at += n
    return fused, slices


class _Block:
    """One decoder layer: its norms, fused weights and the modules whose LoRA slots apply to each slice."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        with torch.no_grad():
            self.qkv, self.qkv_slices = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            self.gate_up, self.gate_up_slices = _fuse([mlp.gate_proj, mlp.up_proj])

    def qkv_lora(self) -> list[tuple[SlotLinear, slice]]:
        # Looked up each step: LoraSlots wraps a module the first time an adapter needs it.
        mods = (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj)
        return [(m, s) for m, s in zip(mods, self.qkv_slices, strict=True) if isinstance(m, SlotLinear)]

    def gate_up_lora(self) -> list[tuple[SlotLinear, slice]]:
        mods = (self.mlp.gate_proj, self.mlp.up_proj)
        return [(m, s) for m, s in zip(mods, self.gate_up_slices, strict=True) if isinstance(m, SlotLinear)]


class PackedLlama:
    """A llama forward over a `SlotStep`'s packed tokens, sharing the model's weights."""

    def __init__(self, model: Any, max_len: int) -> None:
        config, inner = model.config, model.model
        self.model = model
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.heads)
        self.hidden = int(config.hidden_size)
        self.eps = float(config.rms_norm_eps)
        self.scaling = self.head_dim ** -0.5
        self.blocks = [_Block(layer) for layer in inner.layers]
        self.embed, self.final_norm = inner.embed_tokens, inner.norm.weight
        weight = self.embed.weight
        rotary = inner.rotary_emb
        # transformers: angles in float32 from inv_freq, cos/sin scaled by attention_scaling, then cast.
        angles = torch.outer(torch.arange(max_len, device=weight.device).float(), rotary.inv_freq.float())
        angles = torch.cat([angles, angles], dim=-1)
        scale = float(getattr(rotary, "attention_scaling", 1.0))
        self.cos = (angles.cos() * scale).to(weight.dtype)
        self.sin = (angles.sin() * scale).to(weight.dtype)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm's operations in its order (float32 statistics), so results match it.
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(h.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def __call__(self, ids: torch.Tensor, step: SlotStep, cache: SlotCache, deltas: dict[int, torch.Tensor],
                 keep_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [feeding rows, vocab] of each row's last new token, and the final hidden states
        [1, total, hidden] when `keep_hidden`. `ids` [1, total] from `pack_inputs`; `deltas`: steering,
        hidden_states index -> [1, total, hidden]."""
        total = ids.shape[1]
        q_end = self.heads * self.head_dim
        k_end = q_end + self.kv_heads * self.head_dim
        cos, sin = self.cos[step.columns][:, None], self.sin[step.columns][:, None]  # [total, 1, head_dim]
        h = self.embed(ids)
        for i, blk in enumerate(self.blocks):
            x = self._norm(h, blk.ln1)
            qkv = F.linear(x, blk.qkv)
            for module, part in blk.qkv_lora():
                module.add_lora(x, qkv[..., part])
            # q and k lie side by side in the fused output: one rotation for both.
            qk = self._rope(qkv[0, :, :k_end].view(total, self.heads + self.kv_heads, self.head_dim), cos, sin)
            cache.write(i, qk[:, self.heads:], qkv[0, :, k_end:].view(total, self.kv_heads, self.head_dim))
            o = cache.attend(i, qk[:, :self.heads].transpose(0, 1)[None], self.scaling)
            h = h + blk.attn.o_proj(o.reshape(1, total, q_end))
            x = self._norm(h, blk.ln2)
            gu = F.linear(x, blk.gate_up)
            for module, part in blk.gate_up_lora():
                module.add_lora(x, gu[..., part])
            inter = blk.gate_up_slices[0].stop
            h = h + blk.mlp.down_proj(F.silu(gu[..., :inter]) * gu[..., inter:])
            delta = deltas.get(i + 1)
            if delta is not None:
                h = h + delta.to(h.dtype)
        h = self._norm(h, self.final_norm)
        logits = self.model.lm_head(h[0, step.logits_to_keep])
        return logits, (h if keep_hidden else None)
