"""What `rahf-serve --engine vllm` hands to vLLM: one dataclass, each field a flag, turned into EngineArgs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..logprobs import MAX_TOP_LOGPROBS

STEERING_WORKER = "rahf_serve.vllm_engine.steering.SteeringWorker"


@dataclass(frozen=True)
class VllmOptions:
    max_num_seqs: int = 8
    """Requests decoded together in one step (`--max-batch`)."""
    max_model_len: int | None = None
    """Prompt + max_tokens of one request; None = the model's context, at most 4096 (as the built-in engine)."""
    max_num_batched_tokens: int | None = None
    """Token positions one step computes; None = vLLM's default for the platform."""
    max_loras: int = 8
    """Different LoRAs (adapters and blends) in one batch; more wait for a slot."""
    max_lora_rank: int = 64
    """Largest LoRA rank vLLM reserves room for; a blend's rank is the sum of its adapters'."""
    max_cpu_loras: int | None = None
    """LoRAs vLLM keeps in host memory; others are read again from their folders when used."""
    lora_dtype: torch.dtype | None = None
    """What vLLM stores LoRA factors in (`--lora-dtype`); None = the model's dtype."""
    tensor_parallel_size: int = 1
    """GPUs one copy of the model is split over."""
    pipeline_parallel_size: int = 1
    """Pipeline stages (GPUs, or nodes with Ray) the layers are split over."""
    gpu_memory_utilization: float = 0.9
    """Share of each GPU's memory vLLM may take for weights, activations and KV cache."""
    kv_cache_gib: float | None = None
    """KV cache size in GiB (CPU and GPU); None = vLLM's default (on CPU also VLLM_CPU_KVCACHE_SPACE)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of shared prompt prefixes; steered prompts share only with identically steered ones."""
    steering: bool = True
    """Per-request steering by forward hooks: needs an eager model (no torch.compile, no CUDA graphs).
    False gives vLLM its compiled, graph-captured model, and requests with `steering` get a 400."""
    seed: int = 0
    """vLLM's global seed (requests with a `seed` use their own generator)."""
    engine_args: dict[str, Any] = field(default_factory=dict)
    """Any other vllm.EngineArgs field (`--vllm-arg NAME=VALUE`), applied last."""

    def engine_kwargs(self, model_path: str, served_name: str, dtype: str, max_model_len: int) -> dict[str, Any]:
        """Keyword arguments for `vllm.EngineArgs`."""
        kwargs: dict[str, Any] = dict(
            model=model_path, tokenizer=model_path, served_model_name=served_name, dtype=dtype,
            max_model_len=max_model_len, max_num_seqs=self.max_num_seqs, enable_lora=True,
            max_loras=self.max_loras, max_lora_rank=self.max_lora_rank, max_cpu_loras=self.max_cpu_loras,
            tensor_parallel_size=self.tensor_parallel_size, pipeline_parallel_size=self.pipeline_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization, enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed, max_logprobs=MAX_TOP_LOGPROBS, worker_extension_cls=STEERING_WORKER,
            trust_remote_code=False,
        )
        if self.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = self.max_num_batched_tokens
        if self.lora_dtype is not None:  # as a dtype: vLLM's names for it leave out float32
            kwargs["lora_dtype"] = self.lora_dtype
        if self.kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(self.kv_cache_gib * 2**30)
        if self.steering:
            # Hooks run only in an eager model: mode 0 is CompilationMode.NONE.
            kwargs.update(enforce_eager=True, compilation_config={"mode": 0})
        kwargs.update(self.engine_args)
        return kwargs
