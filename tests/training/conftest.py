"""Shared helpers for the training tests: the shared demo data and tiny-model runs through the CLI."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from training.cli import main
from training.config import CONFIG_DIR

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "ultrafeedback_demo_300.sharegpt.json"


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(path: Path, overrides: dict[str, Any] | None = None) -> Path:
    """The shipped tiny.yaml with nested overrides, written to `path`."""
    values = _merge(yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text()), overrides or {})
    path.write_text(yaml.safe_dump(values))
    return path


def train(base_dir: Path, out: Path, *, method: str = "scit", rows: str = "0:8", config: Path | None = None,
          command: str = "run", extra: list[str] | None = None) -> None:
    args = [command, "--base", str(base_dir), "--data", str(DATA), "--rows", rows, "--method", method,
            "--config", str(config or CONFIG_DIR / "tiny.yaml"), "--out", str(out), *(extra or [])]
    assert main(args) == 0


def fork_run(src: Path, dst: Path) -> Path:
    """A new run directory holding `src`'s settings and finished phases 1 and 2."""
    dst.mkdir(parents=True)
    for name in ("run.json", "config.yaml"):
        shutil.copy(src / name, dst / name)
    for name in ("phase1", "collect"):
        shutil.copytree(src / name, dst / name)
    return dst


@pytest.fixture(scope="session")
def scit_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One finished tiny SCIT run (with held-out eval) that read-only tests share."""
    out = tmp_path_factory.mktemp("scit") / "run"
    cfg = tiny_config(out.parent / "cfg.yaml", {"eval": {"rows": "240:244"}})
    train(tiny_model_dir, out, config=cfg)
    return out
