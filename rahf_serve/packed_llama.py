"""The engine's own forward for llama-family bases: the same math as transformers' LlamaModel, in fewer operators.

A decode step on a small model is bound by operator overhead as much as by weights: transformers' llama
modules spend about 3,000 small operators a step around the Linear layers (a torch.profiler count, in
docs/serving.md). This forward runs over the engine's packed step (`SlotStep`: every row's
new tokens in one sequence) with

- q/k/v and gate/up as one matrix each (the Linear modules keep views into them, so nothing is copied and
  every other user of the model sees the same weights), each module's LoRA slots added to its slice of
  the output (with the C products and row kernel, by the product's own call: `_Matrix`);
- activations kept 2-D [tokens, hidden], so each product is one `mm` over a transposed view of the weight
  (no transpose operator per call), and o_proj and down_proj an `addmm` that adds the residual as well;
  for float32 on CPU, the products (the LM head's too) are the C kernel's instead, over a copy of each
  matrix in panels made when the forward is built (`_Matrix`): 1.2-3.7x torch's at a server's row counts;
  that copy in bfloat16 with `matmul_dtype` (AVX512_BF16's dot products or AVX2's fused steps in their
  order, each product's rows rounded too);
- rotary angles from a table built once, indexed by each token's position;
- keys and values written straight into the `SlotCache`, attention through its per-row groups;
- for float32 on CPU, the norms, the rotation with the cache write and one-token rows' attention each one
  call of a C loop (`forward_kernel`), where torch spends longer dispatching them than computing;
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

from .forward_kernel import ForwardKernel, forward_kernel
from .kvcache import SlotCache, SlotStep
from .lora_slots import SlotLinear, SlotSite

log = logging.getLogger(__name__)

_ROPE_TYPES = ("default", "linear", "llama3")
"""Rotary types whose angles depend on the position alone (a table built once is exact)."""
_NO_SITES: tuple[None, ...] = (None,) * 4
"""A block's four LoRA sites (q/k/v, o, gate/up, down) when no module holds LoRA slots."""


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


def packed_forward_for(model: Any, max_len: int, matmul_dtype: torch.dtype = torch.float32) -> PackedLlama | None:
    """The packed forward for `model`, or None (logged with the reason) when it keeps transformers'.
    Raises ValueError for bfloat16 products where they cannot run."""
    reason = unsupported_reason(model)
    if reason is not None:
        if matmul_dtype != torch.float32:
            raise ValueError(f"bfloat16 products need the packed llama forward, which does not cover {reason}")
        log.info("engine forward: transformers' (the packed llama forward does not cover %s)", reason)
        return None
    return PackedLlama(model, max_len, matmul_dtype=matmul_dtype)


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


class _Matrix:
    """A weight [out, in] the forward multiplies by: a transposed view for torch's products, and, once `panel`
    has run, its copy in the C products' layout, which every product then uses."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.t = weight.t()
        self.out = weight.shape[0]
        self._kernel: ForwardKernel | None = None
        self._panels: torch.Tensor | None = None

    def panel(self, kernel: ForwardKernel, panels: torch.Tensor) -> None:
        """Multiply through `kernel` from now on, over `panels`, a copy of the weight in its layout
        (`ForwardKernel.panels`: later changes to the weight do not reach it)."""
        self._panels, self._kernel = panels, kernel

    @property
    def weight(self) -> torch.Tensor:
        return self.t.t()

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                 lora: SlotSite | None = None) -> torch.Tensor:
        """x [tokens, in] times the weight, plus `residual` [tokens, out] when given (the C products add into
        it in place: the forward's residual stream is its own), plus each row's LoRA of `lora`'s modules
        (LoRA is linear: added to the sum, it is added to the product). With the C products and kernel,
        the LoRA rows of a step are added in the product's own call."""
        if self._kernel is not None:
            call = None if lora is None else lora.call
            if call is None:
                y = self._kernel.product(x, self._panels, self.out, residual)
            else:
                y, done = self._kernel.product_then(x, self._panels, self.out, residual, call)
                if done:
                    return y
        else:
            y = torch.mm(x, self.t) if residual is None else torch.addmm(residual, x, self.t)
        if lora is not None:
            lora.add(x, y, x.shape[0])
        return y


class _Block:
    """One decoder layer: its norms, its four matrices and the modules whose LoRA slots apply to each."""

    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.attn, self.mlp = attn, mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        with torch.no_grad():
            qkv, qkv_slices = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
            gate_up, gate_up_slices = _fuse([mlp.gate_proj, mlp.up_proj])
        self.qkv_slices, self.gate_up_slices = tuple(qkv_slices), tuple(gate_up_slices)
        self.qkv, self.gate_up = _Matrix(qkv), _Matrix(gate_up)
        self.o, self.down = _Matrix(attn.o_proj.weight), _Matrix(mlp.down_proj.weight)
        self.inter = self.gate_up_slices[0].stop

        self._seen: tuple[Any, ...] = ()
        self._sites: tuple[SlotSite | None, ...] = _NO_SITES

    def sites(self) -> tuple[SlotSite | None, ...]:
        """The LoRA sites q/k/v (into the fused product), o, gate/up (likewise) and down: each None when none
        of its modules holds LoRA slots. The modules are looked up each step (LoraSlots wraps a module the
        first time an adapter needs it) in their parents' own dicts, cheaper than attribute access."""
        attn, mlp = self.attn._modules, self.mlp._modules
        seen = (attn["q_proj"], attn["k_proj"], attn["v_proj"], attn["o_proj"], mlp["gate_proj"], mlp["up_proj"],
                mlp["down_proj"])
        if seen != self._seen:
            self._seen = seen
            slotted = [m if isinstance(m, SlotLinear) else None for m in seen]
            self._sites = (_site(slotted[:3], self.qkv_slices, self.qkv.out), _site(slotted[3:4]),
                           _site(slotted[4:6], self.gate_up_slices, self.gate_up.out), _site(slotted[6:]))
        return self._sites


def _site(modules: list[SlotLinear | None], parts: tuple[slice | None, ...] = (None,),
          width: int | None = None) -> SlotSite | None:
    return SlotSite(modules, parts, width) if any(m is not None for m in modules) else None


class PackedLlama:
    """A llama forward over a `SlotStep`'s packed tokens, on the model's own weights (and, where the C products
    run, a copy of its matrices in their layout)."""

    def __init__(self, model: Any, max_len: int, *, kernel: bool | ForwardKernel = True,
                 products: bool = True, matmul_dtype: torch.dtype = torch.float32) -> None:
        """`kernel`: use the C operators where they run this model (float32 on CPU) and build (or these
        ones: benchmarks compare two builds); `products`: their matrix products too (a copy of every matrix
        in their layout; without, torch's products over the model's own weights); `matmul_dtype`: what that
        copy is in, float32 or bfloat16 (`ForwardKernel.panels`: each product's rows rounded to bfloat16
        too, everything between the products in float32). Raises ValueError for bfloat16 where the C
        products or their bfloat16 instructions do not run."""
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
        sin = angles.sin() * scale
        half = sin.shape[-1] // 2
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(weight.dtype)
        self.kernel: ForwardKernel | None = None
        """the C operators, where they run this model (float32 on CPU) and build here"""
        self.head = _Matrix(model.lm_head.weight)
        if kernel and weight.dtype == torch.float32 and weight.device.type == "cpu":
            self.kernel = kernel if isinstance(kernel, ForwardKernel) else forward_kernel()
        if matmul_dtype != torch.float32 and (self.kernel is None or not products):
            why = (f"this model is {weight.dtype} on {weight.device.type}"
                   if weight.dtype != torch.float32 or weight.device.type != "cpu"
                   else "the kernel did not build here: the log says why" if self.kernel is None
                   else "the C products are off")
            raise ValueError(f"bfloat16 products are the C kernel's, which runs float32 models on CPU only ({why})")
        if self.kernel is not None and products:
            matrices = [self.head, *(m for b in self.blocks for m in (b.qkv, b.o, b.gate_up, b.down))]
            panels = self.kernel.panels_of([m.weight for m in matrices], matmul_dtype)
            for m, p in zip(matrices, panels, strict=True):
                m.panel(self.kernel, p)

    def _norm(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self.kernel.rms_norm(h, weight, self.eps)
        if h.dtype == torch.float32:  # one operator, bit-identical to LlamaRMSNorm in float32 (measured)
            return F.rms_norm(h, weight.shape, weight, self.eps)
        # LlamaRMSNorm's operations in its order (float32 statistics), so results match it.
        x = h.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return weight * x.to(h.dtype)

    def __call__(self, ids: torch.Tensor, step: SlotStep, cache: SlotCache, deltas: dict[int, torch.Tensor],
                 keep_hidden: bool = False, lora: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [feeding rows, vocab] of each row's last new token, and the final hidden states
        [1, total, hidden] when `keep_hidden`. `ids` [1, total] from `pack_inputs`; `deltas`: steering,
        hidden_states index -> [1, total, hidden]; `lora`: False when no row of the step uses a LoRA slot
        (the slots are not even looked up)."""
        total = ids.shape[1]
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        q_end = heads * head_dim
        k_end = q_end + kv_heads * head_dim
        kernel = self.kernel
        if kernel is None:
            # [total, 1, head_dim]; rotate_half(x) * sin == the halves of x swapped, times sin with its first
            # half negated, so one flip replaces transformers' neg and cat.
            cos, sin = self.cos[step.columns][:, None], self.sin_signed[step.columns][:, None]
        h = self.embed(ids[0])  # [total, hidden]: every product below is one 2-D matmul
        for i, blk in enumerate(self.blocks):
            qkv_lora, o_lora, gate_up_lora, down_lora = blk.sites() if lora else _NO_SITES
            x = self._norm(h, blk.ln1)
            qkv = blk.qkv(x, lora=qkv_lora)
            if kernel is not None:
                kernel.rotate_and_store(qkv, heads, self.cos, self.sin_signed, step.rows, step.columns,
                                        cache.planes[i])
                q = qkv[:, :q_end].view(total, heads, head_dim)
            else:
                qk = qkv[:, :k_end].view(total, heads + kv_heads, head_dim)  # q and k side by side: one rotation
                qk = torch.addcmul(qk * cos, qk.view(total, heads + kv_heads, 2, head_dim // 2).flip(-2).view_as(qk),
                                   sin)
                cache.write(i, qk[:, heads:], qkv[:, k_end:].view(total, kv_heads, head_dim))
                q = qk[:, :heads]
            o = cache.attend_packed(i, q, self.scaling, kernel).view(total, q_end)
            h = blk.o(o, h, o_lora)  # the residual add inside the product
            x = self._norm(h, blk.ln2)
            gu = blk.gate_up(x, lora=gate_up_lora)
            act = F.silu(gu[:, :blk.inter]).mul_(gu[:, blk.inter:])
            h = blk.down(act, h, down_lora)
            delta = deltas.get(i + 1)
            if delta is not None:
                h = h + delta[0].to(h.dtype)
        h = self._norm(h, self.final_norm)
        logits = self.head(h[step.logits_to_keep])  # no adapter reaches the head (LoraSlots refuses them)
        return logits, (h[None] if keep_hidden else None)
