"""kill -9 in the middle of phase 3, then --resume: the same adapter as a run that was never killed."""

import os
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from training.cli import main

from .conftest import ROOT, fork_run, tiny_config

# Many cheap steps and frequent checkpoints, so the kill lands mid-phase with room to spare.
ALIGN = {"align": {"steps": 30, "checkpoint_every": 2, "lora": {"dropout": 0.1}}}


def test_kill_mid_phase3_then_resume_gives_the_same_adapter(scit_run, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", ALIGN)   # dropout on: the RNG state must be restored too
    reference = fork_run(scit_run, tmp_path / "reference")
    assert main(["align", "--out", str(reference), "--config", str(cfg)]) == 0

    killed = fork_run(scit_run, tmp_path / "killed")
    cmd = [sys.executable, "-m", "training.cli", "run", "--out", str(killed), "--resume", "--config", str(cfg)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoints" / "align" / "rank0.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert ckpt.exists() and not (killed / "bundle").exists()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < step < 30

    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = load_file(killed / "bundle" / "adapter_model.safetensors")
    theirs = load_file(reference / "bundle" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
