"""Two CPU processes under `accelerate launch` (gloo) train the same adapter as one process.

`accelerate launch --cpu --num_processes 2` starts a single process (accelerate's CPU launcher
needs mpirun), so the test launches through torchrun with `--multi_gpu` and ACCELERATE_USE_CPU=1.

Both runs use the same global batch sizes; with 2 processes each takes half of every step's batch
and LoRA gradients are summed across them. Tolerance: 1e-5 absolute / 1e-4 relative on every
LoRA weight; only the order of float additions differs (measured max abs difference ~1e-7).
"""

import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .conftest import DATA, ROOT


def test_two_cpu_processes_match_one(scit_run, tiny_model_dir, tmp_path):
    single, cfg = scit_run, scit_run / "config.yaml"   # the shared one-process run
    double = tmp_path / "double"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "training.cli", "run",
           "--base", str(tiny_model_dir), "--data", str(DATA), "--rows", "0:8", "--method", "scit",
           "--config", str(cfg), "--out", str(double)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("phase1/scit/adapter_model.safetensors", "bundle/adapter_model.safetensors"):
        ours, theirs = load_file(double / name), load_file(single / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], atol=1e-5, rtol=1e-4)
    assert (double / "checkpoints" / "align" / "rank1.pt").is_file()   # each process keeps its own state
