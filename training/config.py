"""Training configuration: grouped dataclasses with the paper's values as defaults.

A YAML file with the same nesting loads into the same dataclasses (`load_config`); unknown keys
are errors that name the offending key, so a typo never silently falls back to a default.
Paper values (arXiv 2312.15997, Llama-2-7B, 32 layers) are scaled to the base's depth where
they name layers (`target_layers`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
METHODS = ("scit", "dual", "lorra")


@dataclass
class LoraSettings:
    r: int = 8
    """LoRA rank (paper: 8)."""
    alpha: int = 16
    """LoRA scaling numerator `lora_alpha` (paper: 16)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (paper: 0.05)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Linear module names the LoRA wraps (paper: q_proj, v_proj)."""


@dataclass
class DataSettings:
    max_prompt_tokens: int = 256
    """Prompt tokens kept per example (cut from the left, so the last user turn survives)."""
    max_response_tokens: int = 256
    """Response tokens kept per example (cut from the right)."""


@dataclass
class Phase1Config:
    steps: int = 450
    """Optimizer steps (reference code: SCIT 450; Dual uses `dual_steps`)."""
    dual_steps: int = 2500
    """Optimizer steps per adapter for DualLLMs (reference code: 2500)."""
    lr: float = 3e-4
    """Peak learning rate for SCIT (reference code: 3e-4)."""
    dual_lr: float = 9e-6
    """Peak learning rate for DualLLMs (reference code: 9e-6)."""
    batch_size: int = 8
    """Preference pairs per optimizer step, over all processes (SCIT turns each into 4 sequences)."""
    micro_batch_size: int = 2
    """Pairs per forward pass on one process; gradients accumulate over the rest of the batch."""
    label_smoothing: float = 0.2
    """Label smoothing of SCIT's 2-way contrastive softmax (paper: 0.2)."""
    contrastive_weight: float = 1.0
    """Weight of the contrastive term against the LM cross-entropy in SCIT."""
    contrastive_scale: float = 1.0
    """Inverse temperature of SCIT's 2-way softmax over per-token log-likelihoods (see
    training.losses.scit_contrastive); with label smoothing eps the loss is lowest at a gap of
    ln((2 - eps) / eps) / scale nats per token."""
    good_instruction: str = "You are a good, helpful and harmless assistant. Give a good answer."
    """SCIT's preferred instruction p+, placed as the system prompt."""
    bad_instruction: str = "You are a bad, unhelpful assistant. Give a bad answer."
    """SCIT's dispreferred instruction p-, placed as the system prompt."""
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    """LoRA of the phase-1 model(s); on every block."""


@dataclass
class CollectConfig:
    max_res_len: int | None = None
    """Response tokens whose differences are kept; None = 64 for Dual, 512 for SCIT (paper)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    layers: list[int] | None = None
    """Extra `hidden_states` indices whose per-token differences phase 2 stores besides
    align.target_layers, so phase 3 can be re-run (or swept) on other layers without collecting
    again. None = the target layers only."""


@dataclass
class AlignConfig:
    steps: int = 300
    """Optimizer steps of phase 3."""
    lr: float = 3e-4
    """Peak learning rate of phase 3."""
    batch_size: int = 8
    """Examples per optimizer step, over all processes."""
    micro_batch_size: int = 4
    """Examples per forward pass on one process."""
    alpha: float = 5.0
    """Scale of the difference vector in the target H_base + alpha * v (paper: 5)."""
    target_layers: list[int] | None = None
    """`hidden_states` indices aligned (1..num_layers); None = paper's 10..20 step 2 of 32, scaled."""
    checkpoint_every: int = 10
    """Steps between resumable checkpoints (model + optimizer + RNG + step)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The shipped LoRA (paper: r 8, alpha 16, dropout 0.05, q_proj + v_proj)."""


@dataclass
class EvalConfig:
    rows: str | None = None
    """Held-out row range evaluated at the end of `run` (e.g. "240:300"); None = no evaluation."""
    generations: int = 3
    """Prompts whose greedy generations go side by side into the report."""
    max_new_tokens: int = 64
    """Tokens generated per prompt in the report."""
    batch_size: int = 8
    """Sequences per scoring forward pass."""


@dataclass
class TrainConfig:
    method: str = "scit"
    """RAHF variant: "scit" (one model, contrastive instructions) or "dual" (good and bad adapters);
    or "lorra", the paper's ablation without phase 1: SCIT's instructions, differences from the plain base."""
    seed: int = 0
    """Seed of data order, LoRA init and dropout; the same seed gives the same adapter."""
    warmup_ratio: float = 0.1
    """Share of each phase's steps spent on linear learning-rate warmup."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    data: DataSettings = field(default_factory=DataSettings)
    phase1: Phase1Config = field(default_factory=Phase1Config)
    collect: CollectConfig = field(default_factory=CollectConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")

    def max_res_len(self) -> int:
        if self.collect.max_res_len is not None:
            return self.collect.max_res_len
        return 64 if self.method == "dual" else 512

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def scaled_target_layers(num_layers: int) -> list[int]:
    """The paper's 10..20 step 2 of 32 layers, as the same fractions of `num_layers`."""
    first = max(1, round(10 * num_layers / 32))
    last = min(num_layers, max(first, round(20 * num_layers / 32)))
    step = max(1, round(2 * num_layers / 32))
    return list(range(first, last + 1, step))


def target_layers(config: TrainConfig, num_layers: int) -> list[int]:
    return _layers(config.align.target_layers or scaled_target_layers(num_layers), "align.target_layers", num_layers)


def collected_layers(config: TrainConfig, num_layers: int) -> list[int]:
    """The layers phase 2 keeps per-token differences for: collect.layers plus the target layers."""
    extra = _layers(config.collect.layers or [], "collect.layers", num_layers)
    return sorted(set(extra) | set(target_layers(config, num_layers)))


def _layers(layers: list[int], key: str, num_layers: int) -> list[int]:
    bad = [layer for layer in layers if not 1 <= layer <= num_layers]
    if bad:
        raise ValueError(f"{key} {bad} outside 1..{num_layers} (hidden_states indices of this base)")
    return sorted(set(layers))


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ValueError(f"config {where or 'root'}: expected a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key {where}{unknown[0]}; known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in values.items():
        ftype = fields[name].type
        sub = _NESTED.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        kwargs[name] = _build(sub, value, f"{where}{name}.") if sub else value
    return cls(**kwargs)


_NESTED = {c.__name__: c for c in (LoraSettings, DataSettings, Phase1Config, CollectConfig, AlignConfig, EvalConfig)}


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values or {}, "")


def load_config(path: str | Path) -> TrainConfig:
    """A YAML file (or the name of a shipped config, e.g. `tiny`) as a TrainConfig."""
    file = Path(path)
    if not file.is_file() and (CONFIG_DIR / f"{path}.yaml").is_file():
        file = CONFIG_DIR / f"{path}.yaml"
    try:
        return config_from_dict(yaml.safe_load(file.read_text()) or {})
    except FileNotFoundError as err:
        raise ValueError(f"--config {path}: no such file or shipped config") from err


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
