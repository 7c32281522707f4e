"""kill -9 in the middle of phase 1 or 3, then --resume: the same adapters as a run that was never killed."""

import json
import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from training.cli import main

from .conftest import DATA, ROOT, fork_run, tiny_config

# Many cheap steps and frequent checkpoints, so the kill lands mid-phase with room to spare.
ALIGN = {"align": {"steps": 30, "checkpoint_every": 2, "lora": {"dropout": 0.1}}}


def run_then_kill(cmd: list[str], ckpt) -> int:
    """Start `rahf-train` as `cmd`, SIGKILL it as soon as `ckpt` exists; the checkpoint's step."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert ckpt.exists()
    return int(torch.load(ckpt, weights_only=True)["step"])


def resume(cmd: list[str]) -> None:
    subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def test_kill_mid_phase3_then_resume_gives_the_same_adapter(scit_run, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", ALIGN)   # dropout on: the RNG state must be restored too
    reference = fork_run(scit_run, tmp_path / "reference")
    assert main(["align", "--out", str(reference), "--config", str(cfg)]) == 0

    killed = fork_run(scit_run, tmp_path / "killed")
    cmd = [sys.executable, "-m", "training.cli", "run", "--out", str(killed), "--resume", "--config", str(cfg)]
    assert 0 < run_then_kill(cmd, killed / "checkpoints" / "align" / "rank0.pt") < 30
    assert not (killed / "bundle").exists()

    resume(cmd)
    ours = load_file(killed / "bundle" / "adapter_model.safetensors")
    theirs = load_file(reference / "bundle" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


PHASE1 = {"phase1": {"dual_steps": 12, "checkpoint_every": 2, "val_rows": "240:244", "val_every": 4,
                     "lora": {"dropout": 0.1}}}


def test_kill_mid_dual_phase1_then_resume_gives_the_same_adapters_and_validation(tiny_model_dir, tmp_path):
    """Killed while "bad" trains, after "good" finished: the resumed phase 1 restores "good" and the
    validation history of both, and ends where an unbroken run ends."""
    cfg = tiny_config(tmp_path / "c.yaml", PHASE1)
    args = ["--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "0:8", "--method", "dual",
            "--config", str(cfg)]
    reference = tmp_path / "reference"
    assert main(["phase1", "--out", str(reference), *args]) == 0

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "training.cli", "phase1", "--out", str(killed), *args]
    assert 0 < run_then_kill(cmd, killed / "checkpoints" / "phase1" / "bad" / "rank0.pt") < 12
    assert not (killed / "phase1").exists()

    resume([*cmd, "--resume"])
    for name in ("good", "bad"):
        ours = load_file(killed / "phase1" / name / "adapter_model.safetensors")
        theirs = load_file(reference / "phase1" / name / "adapter_model.safetensors")
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), (name, key)
    ours, theirs = (json.loads((run / "phase1" / "validation.json").read_text())["history"]
                    for run in (killed, reference))
    assert [r["training"] for r in ours] == ["good"] * 4 + ["bad"] * 4
    assert ours == theirs
