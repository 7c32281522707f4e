"""Fixtures for Hub round trips: a loopback Hub server and a client that runs in its own process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[2]
# Anything that could point the client at a real Hub or a real token is dropped from its environment.
_SCRUBBED = ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HOME", "HF_HUB_CACHE",
             "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_XET")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_endpoint() -> str:
    """A loopback URL where nothing listens: what "no network" looks like to the client."""
    return f"http://127.0.0.1:{free_port()}"


class HubClient:
    """Runs tests/hub/client.py (or any command) against the server, with an isolated HF_HOME."""

    def __init__(self, server: HubServer, home: Path) -> None:
        self.server, self.home = server, home
        self.cache = home / "hub"

    def env(self, *, offline: bool = False, endpoint: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        env.update(HF_ENDPOINT=endpoint or self.server.url, HF_HUB_DISABLE_XET="1", HF_HOME=str(self.home),
                   HF_HUB_CACHE=str(self.cache), HF_HUB_OFFLINE="1" if offline else "0",
                   HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1", **extra)
        return env

    def run(self, args: list[str], **env: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, cwd=ROOT, env=self.env(**env), capture_output=True, text=True, timeout=120)

    def call(self, *calls: dict[str, Any], **env: Any) -> list[dict[str, Any]]:
        proc = self.run([sys.executable, "-m", "tests.hub.client", json.dumps(calls)], **env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def hub_server(tmp_path: Path):
    with HubServer(tmp_path / "hub-server") as server:
        yield server


@pytest.fixture
def hub(hub_server: HubServer, tmp_path: Path) -> HubClient:
    return HubClient(hub_server, tmp_path / "hf-home")
