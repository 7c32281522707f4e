"""Training configuration: grouped dataclasses with the paper's values as defaults.

A YAML file with the same nesting loads into the same dataclasses (`load_config`); unknown keys
and values of the wrong type are errors that name the dotted key, so a typo never silently falls
back to a default. `apply_overrides` sets any field from command-line tokens such as
`--align.alpha 10 --align.target_layers 9,11,13 --phase1.val_rows none`.
Paper values (arXiv 2312.15997, Llama-2-7B, 32 layers) are scaled to the base's depth where
they name layers (`target_layers`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin

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
    epochs: float = 2.0
    """Passes over the training pairs for SCIT when `steps` is None (reference code: 2 epochs)."""
    dual_epochs: float = 3.0
    """Passes over the training pairs per adapter for DualLLMs when `dual_steps` is None
    (reference code: 3 epochs)."""
    steps: int | None = None
    """Optimizer steps of SCIT; None = `epochs` x pairs / batch_size."""
    dual_steps: int | None = None
    """Optimizer steps per DualLLMs adapter; None = `dual_epochs` x pairs / batch_size."""
    lr: float = 2e-4
    """Peak learning rate for SCIT. The reference code fine-tunes every weight at 2e-5; a LoRA
    phase 1 needs about ten times that (the usual LoRA practice)."""
    dual_lr: float = 2e-4
    """Peak learning rate for DualLLMs (reference code: 2e-5 with full fine-tuning, as for SCIT)."""
    batch_size: int = 64
    """Preference pairs per optimizer step, over all processes (reference code: SCIT 64, Dual 128);
    SCIT turns each into 4 sequences."""
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
    val_rows: str | None = None
    """Rows of the run's data (outside --rows) scored every `val_every` steps: SCIT's contrast and
    chosen-over-rejected accuracy under p+, Dual's good-vs-bad margin. None = no validation."""
    val_every: int = 25
    """Steps between two validation passes (also run before the first step and after the last)."""
    checkpoint_every: int = 10
    """Steps between resumable checkpoints of the adapter in training (weights + optimizer + RNG + step +
    validation so far); `rahf-train phase1 --resume` or `run --resume` continues from the last. 0: none."""
    snapshot_every: int = 0
    """Save each phase-1 adapter every this many steps (snapshots/phase1/<adapter>/step-NNNN, PEFT
    folders), so how long phase 1 trains can be chosen afterwards on accuracy and generation health
    together (benchmarks/phase1_health.py, then `rahf-train pick-phase1`); 0 = no snapshots."""
    stop_at: list[str] = field(default_factory=list)
    """ADAPTER=STEP entries (`--phase1.stop_at good=50`): that adapter's training ends after STEP
    optimizer steps while its learning-rate schedule still spans all its steps, so it equals the
    snapshot a full run saves at STEP (what `rahf-train pick-phase1` records); empty = every step."""
    kl_to_base: float = 0.0
    """Weight beta of KL(base || "good") on the response tokens "good" learns (Dual only): the loss
    becomes (1 + beta) x the cross-entropy to the mixture (data + beta x base) / (1 + beta), so "good"
    learns the chosen answers while keeping part of the base's next-token distribution at every
    position, instead of imitating HH's short hedging answers until greedy decoding loops on them.
    "bad" is never shipped, so it trains without it; 0 = plain SFT."""
    mix_data: str | None = None
    """A second preference set whose pairs phase 1 trains on beside the run's (shuffled together), for
    phase 1 only: the difference vectors, phase 3 and validation still use the run's data. For preferred
    answers that read like ordinary chat when the run's are short and hedging (HH-RLHF harmless), so
    "good" learns the preference without learning to answer everything in that one register."""
    mix_rows: str | None = None
    """Row range START:STOP of `mix_data` (default: all)."""
    min_separation: float = 0.01
    """Phase 2 refuses a phase 1 whose validation separation (SCIT contrast, Dual good-vs-bad
    margin, nats per token) rose by less than this over training, unless forced."""

    def __post_init__(self) -> None:
        for entry in self.stop_at:
            name, sep, step = entry.partition("=")
            if not name or not sep or not step.isdigit() or int(step) < 1:
                raise ValueError(f"phase1.stop_at: expected ADAPTER=STEP with STEP >= 1, got {entry!r}")
        if self.kl_to_base < 0:
            raise ValueError(f"phase1.kl_to_base must be >= 0, got {self.kl_to_base}")
        if self.mix_rows is not None and self.mix_data is None:
            raise ValueError("phase1.mix_rows names rows of phase1.mix_data, which is not set")

    def stop_steps(self, adapters: list[str]) -> dict[str, int | None]:
        """The step `stop_at` ends each of `adapters` at (None: every step of its schedule); an entry
        naming another adapter is an error, not a silent full run."""
        steps = {name: int(step) for name, _, step in (entry.partition("=") for entry in self.stop_at)}
        unknown = sorted(set(steps) - set(adapters))
        if unknown:
            raise ValueError(f"phase1.stop_at names {unknown}; this method's phase-1 adapters are {adapters}")
        return {name: steps.get(name) for name in adapters}

    def steps_for(self, method: str, n_pairs: int) -> int:
        """Optimizer steps per phase-1 model: the explicit count, else epochs over `n_pairs`."""
        steps, epochs = (self.dual_steps, self.dual_epochs) if method == "dual" else (self.steps, self.epochs)
        return steps if steps is not None else max(1, round(epochs * n_pairs / self.batch_size))


@dataclass
class CollectConfig:
    max_res_len: int | None = None
    """Response tokens whose differences are kept; None = 64 for Dual, 512 for SCIT (paper)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    pairs: int | None = None
    """Pairs (the first N of the run's rows) whose stimuli phase 2 collects and phase 3 trains on;
    None = all. Phase 3 sees align.steps x align.batch_size examples, so on a CPU collecting
    far more than that only costs time."""
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
    kl_to_phase1: float = 0.0
    """Weight of KL(phase-1 model || tuned model) on the stimuli's response tokens, next to the
    alignment distance: the representations move at the target layers while the next-token
    distributions are held near the phase-1 model's, the part of the model greedy decoding reads.
    Costs the rest of the forward in both passes (40 steps on the 2-core CPU: 7.8 minutes against 3.6-3.8
    without it, under different loads); 0 = the paper's loss alone."""
    target_layers: list[int] | None = None
    """`hidden_states` indices aligned (1..num_layers); None = paper's 10..20 step 2 of 32, scaled."""
    checkpoint_every: int = 10
    """Steps between resumable checkpoints (model + optimizer + RNG + step)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """The shipped LoRA (paper: r 8, alpha 16, dropout 0.05, q_proj + v_proj)."""

    def __post_init__(self) -> None:
        if self.kl_to_phase1 < 0:
            raise ValueError(f"align.kl_to_phase1 must be >= 0, got {self.kl_to_phase1}")


@dataclass
class EvalConfig:
    rows: str | None = None
    """Held-out row range evaluated at the end of `run` (e.g. "240:300"); None = no evaluation."""
    max_prompt_tokens: int = 256
    """Prompt tokens kept when scoring a pair (cut from the left, so the last user turn survives)."""
    max_response_tokens: int = 256
    """Answer tokens scored per side: the preference label is about the whole answer, and 256
    tokens hold the whole answer for 99% of HH-RLHF pairs (median 27-36 tokens)."""
    generations: int = 3
    """Prompts whose greedy generations go side by side into the report."""
    max_new_tokens: int = 64
    """Tokens generated per prompt (report, behaviour and health)."""
    batch_size: int = 8
    """Prompts per generation batch."""


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
    """`values` as a `cls`; every key must be a field and every leaf must have the field's type."""
    if not isinstance(values, dict):
        raise ValueError(f"config {where.rstrip('.') or 'root'}: expected a mapping, got {type(values).__name__}")
    hints = _hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        key = f"{where}{unknown[0]}"
        raise ValueError(f"unknown config key {key}{_suggest(key)}; known in {where.rstrip('.') or 'root'}: "
                         f"{', '.join(sorted(hints))}")
    kwargs = {}
    for name, value in values.items():
        ftype, key = hints[name], f"{where}{name}"
        if dataclasses.is_dataclass(ftype):
            kwargs[name] = _build(ftype, value, f"{key}.")
            continue
        try:
            kwargs[name] = _typed(value, ftype)
        except TypeError:
            hint = ""
            if isinstance(value, str) and _accepts(ftype, float) and _is_number(value):
                hint = f"; YAML reads {value} as a string: write it with a dot, e.g. 3.0e-4"
            raise ValueError(f"config key {key}: expected {_type_name(ftype)}, got {value!r} "
                             f"({type(value).__name__}){hint}") from None
    return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (the annotations are strings under `from __future__ import annotations`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _typed(value: Any, ftype: Any) -> Any:
    """`value` if it fits `ftype` (an int widened to float for a float field), else TypeError."""
    if _is_union(ftype):
        if value is None and type(None) in get_args(ftype):
            return None
        for option in get_args(ftype):
            if option is not type(None):
                with contextlib.suppress(TypeError):
                    return _typed(value, option)
        raise TypeError(value)
    if get_origin(ftype) is list:
        if not isinstance(value, list):
            raise TypeError(value)
        (item,) = get_args(ftype)
        return [_typed(v, item) for v in value]
    if ftype is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and ftype is not bool:
        raise TypeError(value)
    if isinstance(ftype, type) and isinstance(value, ftype):
        return value
    raise TypeError(value)


def _parsed(text: str, ftype: Any) -> Any:
    """A command-line value as `ftype`: none/null for None, comma-separated lists; else TypeError."""
    if _is_union(ftype):
        if text.lower() in ("none", "null") and type(None) in get_args(ftype):
            return None
        for option in get_args(ftype):
            if option is not type(None):
                with contextlib.suppress(TypeError):
                    return _parsed(text, option)
        raise TypeError(text)
    if get_origin(ftype) is list:
        (item,) = get_args(ftype)
        inner = text[1:-1] if text.startswith("[") and text.endswith("]") else text
        return [_parsed(part.strip(), item) for part in inner.split(",")] if inner.strip() else []
    if ftype is bool:
        if text.lower() in _BOOLS:
            return _BOOLS[text.lower()]
        raise TypeError(text)
    if ftype in (int, float):
        try:
            return ftype(text)
        except ValueError:
            raise TypeError(text) from None
    if ftype is str:
        return text
    raise TypeError(text)


_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _is_union(ftype: Any) -> bool:
    return get_origin(ftype) in (typing.Union, types.UnionType)


def _accepts(ftype: Any, kind: type) -> bool:
    return ftype is kind or (_is_union(ftype) and kind in get_args(ftype))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(ftype: Any) -> str:
    if ftype is type(None):
        return "None"
    if isinstance(ftype, type) and not get_args(ftype):
        return ftype.__name__
    if _is_union(ftype):
        return " | ".join(_type_name(option) for option in get_args(ftype))
    return str(ftype)


def setting_keys(cls: type | None = None, where: str = "") -> list[str]:
    """Every leaf field of `cls` (default TrainConfig) as a dotted key, e.g. align.lora.r."""
    keys = []
    for name, ftype in _hints(cls or TrainConfig).items():
        if dataclasses.is_dataclass(ftype):
            keys += setting_keys(ftype, f"{where}{name}.")
        else:
            keys.append(f"{where}{name}")
    return keys


def _suggest(key: str, prefix: str = "") -> str:
    close = difflib.get_close_matches(key, setting_keys(), n=1, cutoff=0.6)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def split_overrides(tokens: list[str]) -> list[tuple[str, str | None]]:
    """`--a.b VALUE` / `--a.b=VALUE` tokens as (key, value) pairs; value None when it is missing.

    A value that itself starts with `--` must use the `=` form.
    """
    pairs: list[tuple[str, str | None]] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected a setting --SECTION.FIELD, got {token!r}")
        key, eq, value = token[2:].partition("=")
        if eq:
            pairs.append((key, value))
            i += 1
        elif i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
            pairs.append((key, tokens[i + 1]))
            i += 2
        else:
            pairs.append((key, None))
            i += 1
    return pairs


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """A copy of `config` with command-line settings applied: `--align.alpha 10`, `--eval.rows=240:300`.

    Values parse by the field's type: int, float, str, bool (true/false/1/0/yes/no), `none`/`null`
    for an optional field, comma-separated lists (`--align.target_layers 9,11,13`). A bad value or an
    unknown key raises ValueError naming the flag.
    """
    values = config.to_dict()
    for key, text in split_overrides(overrides):
        flag = f"--{key}"
        if key not in setting_keys():
            raise ValueError(f"unknown setting {flag}{_suggest(key, '--')}")
        *path, name = key.split(".")
        section, cls = values, TrainConfig
        for part in path:
            section, cls = section[part], _hints(cls)[part]
        ftype = _hints(cls)[name]
        if text is None:
            raise ValueError(f"{flag}: expected a value ({_type_name(ftype)})")
        try:
            section[name] = _parsed(text, ftype)
        except TypeError:
            raise ValueError(f"{flag}: expected {_override_type(ftype)}, got {text!r}") from None
    return config_from_dict(values)


def _override_type(ftype: Any) -> str:
    notes = []
    if get_origin(ftype) is list or (_is_union(ftype) and any(get_origin(a) is list for a in get_args(ftype))):
        notes.append("comma-separated")
    if _accepts(ftype, bool):
        notes.append("true/false/1/0/yes/no")
    if _accepts(ftype, type(None)):
        notes.append("none for None")
    return _type_name(ftype) + (f" ({'; '.join(notes)})" if notes else "")


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
