"""What every phase needs: the accelerator, the config, the data, the run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from peft import LoraConfig

from rahf_serve.models import BaseModel, load_base

from .config import LoraSettings, TrainConfig
from .data import PreferenceData
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
