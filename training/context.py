"""What every phase needs: the accelerator, the config, the data, the run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import LoraConfig

from rahf_serve.models import BaseModel, load_base

from .config import LoraSettings, TrainConfig
from .data import DataError, Pair, PreferenceData, load_preferences, parse_rows
from .rundir import RunDir


@dataclass
class Context:
    acc: Accelerator
    config: TrainConfig
    base_spec: str
    data: PreferenceData
    out: Path
    command: str | None = None
    force: bool = False

    @property
    def run(self) -> RunDir:
        return RunDir(self.out)

    @cached_property
    def phase1_mix(self) -> PreferenceData | None:
        """`phase1.mix_data`'s pairs. Rows of the run's own file that validate phase 1 or are held out
        for evaluation are refused: training on them would make those numbers meaningless."""
        p1 = self.config.phase1
        if not p1.mix_data:
            return None
        mix = load_preferences(p1.mix_data, p1.mix_rows)
        if Path(p1.mix_data).expanduser().resolve() == Path(self.data.source).expanduser().resolve():
            n = mix.source_rows
            held = {"phase1.val_rows": self.config.phase1.val_rows, "eval.rows": self.config.eval.rows}
            for name, spec in held.items():
                if spec and set(parse_rows(spec, n)) & set(parse_rows(p1.mix_rows, n)):
                    raise DataError(f"phase1.mix_rows {p1.mix_rows or 'all'} overlaps {name} {spec} of the same "
                                    f"file {p1.mix_data}: phase 1 would train on the rows that judge it")
        return mix

    def phase1_pairs(self) -> list[Pair]:
        """What phase 1 trains on: the run's pairs, then `phase1.mix_data`'s."""
        return self.data.pairs + (self.phase1_mix.pairs if self.phase1_mix else [])

    def load_base(self) -> BaseModel:
        """A fresh base per phase: PEFT wraps in place, and dropping it frees the previous phase."""
        return load_base(self.base_spec, device=str(self.acc.device), dtype="auto")

    def log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.run.metrics, "a") as fh:
                fh.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def commit(self, phase: str, write: Callable[[Path], None], barrier: bool = True) -> Path:
        """`RunDir.commit` on the main process. `barrier=False` for code that only the main process
        runs (a barrier there would hang)."""
        if self.acc.is_main_process:
            self.run.commit(phase, write)
        if barrier:
            self.acc.wait_for_everyone()
        return self.run.output(phase)


def lora_config(settings: LoraSettings, layers: list[int] | None = None) -> LoraConfig:
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(settings.target_modules), layers_to_transform=layers, bias="none",
                      task_type="CAUSAL_LM")


def only_trainable(model: Any, adapter: str) -> None:
    """Make exactly `adapter`'s LoRA weights trainable (PEFT's own switch differs across versions)."""
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name and f".{adapter}." in f"{name}.")
