"""The real rahf-serve app (engine, registry, API, UI) on a free loopback port, for the UI tests."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from app.ui import mount_ui
from rahf_serve.api import create_app
from rahf_serve.engine import Engine
from rahf_serve.models import load_base
from rahf_serve.registry import AdapterRegistry
from tests.helpers import random_lora_bundle


@dataclass
class Arena:
    url: str
    """server root; the UI is at url + '/ui/'"""
    votes: Path
    adapter_dir: Path
    registry: AdapterRegistry


@contextmanager
def serve_arena(root: Path, model_dir: Path, *, api_key: str | None = None) -> Iterator[Arena]:
    """`rahf-serve` as app/server.py assembles it, with two adapters and the UI, on a free port."""
    base = load_base(str(model_dir), device="cpu", dtype="float32")
    adapter_dir = root / "adapters"
    for seed, name in enumerate(("kind", "terse"), start=1):
        random_lora_bundle(base, adapter_dir / name, seed=seed)
    engine = Engine(base, max_batch=8, max_new_tokens=64)
    registry = AdapterRegistry(engine, adapter_dir)
    registry.load_dir()
    # Bind first: the UI must know the port before the app starts, and a bound socket cannot be taken.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    api = create_app(engine, registry, api_key=api_key)
    mount_ui(api, base_url=url, api_key=api_key, votes_path=root / "votes.jsonl")
    server = uvicorn.Server(uvicorn.Config(api, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    with engine:
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        try:
            yield Arena(url, root / "votes.jsonl", adapter_dir, registry)
        finally:
            server.should_exit = True
            thread.join(timeout=15)
            sock.close()
