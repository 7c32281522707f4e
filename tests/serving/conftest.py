"""Serving fixtures: a tiny base with two adapter bundles, a running engine, a live HTTP server."""

from __future__ import annotations

import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch
import uvicorn

from rahf_serve.api import create_app
from rahf_serve.engine import Engine
from rahf_serve.models import BaseModel, load_base
from rahf_serve.registry import AdapterRegistry
from rahf_serve.request import GenerationRequest, StreamEvent
from tests.conftest import build_tiny_model_dir
from tests.helpers import built_for, random_lora_bundle

T = TypeVar("T")


def isas_here() -> list[str]:
    """What torch can find on CPUs this machine can stand in for, to build the C kernels as there: on x86 with
    AVX2, plain x86-64 too, where the kernels' sums are not fused multiply-adds; with AVX-512 (the products'
    wider blocks) AVX2 as well; elsewhere what torch found here."""
    here = torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() in ("x86_64", "amd64") and here in ("AVX2", "AVX512"):
        return ["DEFAULT", "AVX2"] + (["AVX512"] if here == "AVX512" else [])
    return [here]


def bf16_build(build: Callable[[], T], runs_bf16: Callable[[T], bool]) -> T:
    """The AVX-512 build of a C kernel (`build()`), whose bfloat16 dot products run where the CPU has
    AVX512_BF16 (`runs_bf16(built)`); elsewhere nothing stands in for the instruction and the tests that
    need it are skipped (others check the refusal on every build)."""
    if "AVX512" not in isas_here():
        pytest.skip("needs the AVX-512 build: this CPU has no AVX-512")
    built = built_for("AVX512", build)
    if not runs_bf16(built):
        pytest.skip("needs AVX512_BF16, which this CPU lacks")
    return built


def lets_other_threads_run(call, attempts: int = 3) -> bool:
    """Whether another Python thread ran while `call()` ran on this one (on one torch thread), away from the
    call's ends: in at least a twentieth of the quarter-millisecond spans between its first and last tenth.
    A call that holds the GIL lets the other thread run only at its ends, so in none of them. One that lets go
    lets it run whenever the machine does: on a shared 2-core host with a third busy thread, in about half of
    them. Calls of tens of ms span many of the scheduler's slices; a host that stalls the other thread through
    one gets another try, which a call that holds the GIL never passes."""
    span = 0.00025
    times: list[float] = []
    stop = threading.Event()

    def tick() -> None:  # notes the time about twice a span, however fast it loops
        last = 0.0
        while not stop.is_set():
            now = time.perf_counter()
            if now - last >= span / 2:
                times.append(now)
                last = now

    threads, interval = torch.get_num_threads(), sys.getswitchinterval()
    worker = threading.Thread(target=tick)
    try:
        torch.set_num_threads(1)
        sys.setswitchinterval(0.00005)
        worker.start()
        while not times:  # the ticker is running
            pass
        for _ in range(attempts):
            start = time.perf_counter()
            call()
            took = time.perf_counter() - start
            first, last = start + took / 10, start + took * 9 / 10
            seen = {int((t - first) / span) for t in list(times) if first < t < last}
            if len(seen) >= (last - first) / span / 20:
                return True
    finally:
        stop.set()
        worker.join()
        sys.setswitchinterval(interval)
        torch.set_num_threads(threads)
    return False


@pytest.fixture(scope="session")
def lively_model_dir(tmp_path_factory, tokenizer) -> Path:
    # A larger init than the default 0.02 makes greedy outputs vary from token to token, so
    # "identical outputs" tests compare real sequences rather than one token repeated.
    return build_tiny_model_dir(tmp_path_factory.mktemp("lively-llama"), tokenizer, seed=3, initializer_range=0.3)


def burst(engine: Engine, reqs: list[GenerationRequest]) -> tuple[list[list[int]], list[tuple[int, StreamEvent]]]:
    """Submit `reqs` as one group; each request's tokens, and every event as (request index, event) in order."""
    log: list[tuple[int, StreamEvent]] = []
    done = [threading.Event() for _ in reqs]

    def sink(i: int):
        def put(event: StreamEvent) -> None:
            log.append((i, event))
            if event.finish_reason is not None:
                done[i].set()
        return put

    engine.submit_many(reqs, [sink(i) for i in range(len(reqs))])
    assert all(d.wait(120) for d in done)
    assert all(e.error is None for _, e in log)
    return [[t for j, e in log if j == i for t in e.token_ids] for i in range(len(reqs))], log


def load_lively(path: Path) -> BaseModel:
    return load_base(str(path), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, lively_model_dir) -> Path:
    base = load_lively(lively_model_dir)
    root = tmp_path_factory.mktemp("adapters")
    random_lora_bundle(base, root / "kind", seed=1)
    random_lora_bundle(base, root / "terse", seed=2, r=2, targets=("q_proj", "v_proj", "o_proj"))
    return root


@pytest.fixture(scope="module")
def runtime(lively_model_dir, adapter_dir) -> Iterator[tuple[Engine, AdapterRegistry]]:
    engine = Engine(load_lively(lively_model_dir), max_batch=8, max_new_tokens=64)
    registry = AdapterRegistry(engine, adapter_dir)
    registry.load_dir()
    with engine:
        yield engine, registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on a free loopback port in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@pytest.fixture(scope="module")
def server(runtime) -> Iterator[LiveServer]:
    engine, registry = runtime
    with LiveServer(create_app(engine, registry)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
