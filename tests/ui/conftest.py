"""UI fixtures: the real rahf-serve app on a loopback port (tests/ui/server.py), and Chromium.

The browser is Debian's `chromium` (`make browser` installs it); nothing is downloaded. Without
/usr/bin/chromium the browser tests skip and say so.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import build_tiny_model_dir
from tests.ui.page import CHROMIUM, CHROMIUM_ARGS
from tests.ui.server import Arena, serve_arena


@pytest.fixture(scope="session")
def arena_model_dir(tmp_path_factory, tokenizer) -> Path:
    # A wide init makes greedy text vary token to token, so base and adapter answers differ visibly.
    return build_tiny_model_dir(tmp_path_factory.mktemp("arena-llama"), tokenizer, seed=3, initializer_range=0.3)


@pytest.fixture(scope="module")
def arena(tmp_path_factory, arena_model_dir) -> Iterator[Arena]:
    with serve_arena(tmp_path_factory.mktemp("arena"), arena_model_dir) as live:
        yield live


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (`make browser`) to run the UI browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
