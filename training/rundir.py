"""The run directory: every path of a training run, and the one way a phase's output appears.

    run.json                base, data, rows, method: what later subcommands and --resume reuse
    config.yaml             the full config of the run
    metrics.jsonl           one JSON record per step, validation pass and phase
    phase1/                 phase-1 adapter(s) (PEFT folders), losses.json, validation.json
    collect/                per-token diffs, per-layer mean vectors, summary.json
    checkpoints/<phase>/    resumable checkpoints (rank{i}.pt)
    snapshots/phase1/<adapter>/step-NNNN/   phase-1 adapters part way (phase1.snapshot_every)
    bundle/                 the adapter bundle (rahf_serve bundle format)
    eval/                   eval.json + report.md on held-out rows
    plots/                  loss.png, validation.png, norms.png, accuracy.png

A phase's output is written into a temporary folder and renamed into place (`commit`), so a killed
run leaves every finished phase whole and no half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PHASES = ("phase1", "collect", "align")
"""The training phases in order; each is skipped by --resume once its output folder exists."""


@dataclass(frozen=True)
class RunDir:
    root: Path

    # Files of the run as a whole.
    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    # Phase outputs: `output(phase)` is the folder whose existence means the phase finished.
    def output(self, phase: str) -> Path:
        return self.root / {"phase1": "phase1", "collect": "collect", "align": "bundle", "eval": "eval"}[phase]

    @property
    def phase1(self) -> Path:
        return self.output("phase1")

    def adapter(self, name: str) -> Path:
        """A phase-1 adapter's PEFT folder (PEFT saves a non-default adapter under its name)."""
        return self.phase1 / name

    @property
    def validation(self) -> Path:
        return self.phase1 / "validation.json"

    @property
    def collect(self) -> Path:
        return self.output("collect")

    @property
    def diffs(self) -> Path:
        return self.collect / "diffs.safetensors"

    @property
    def vectors(self) -> Path:
        return self.collect / "vectors.safetensors"

    @property
    def summary(self) -> Path:
        return self.collect / "summary.json"

    @property
    def bundle(self) -> Path:
        return self.output("align")

    @property
    def eval(self) -> Path:
        return self.output("eval")

    def snapshot(self, adapter: str, step: int) -> Path:
        """A phase-1 adapter's PEFT folder as it was after `step` optimizer steps."""
        return self.root / "snapshots" / "phase1" / adapter / f"step-{step:04d}"

    def checkpoints(self, phase: str) -> Path:
        return self.root / "checkpoints" / phase

    def done(self, phase: str) -> bool:
        return self.output(phase).is_dir()

    def commit(self, phase: str, write: Callable[[Path], None]) -> Path:
        """Call `write(tmp)` on a fresh temporary folder, then rename it to the phase's output."""
        final = self.output(phase)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=self.root))
        try:
            write(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final
