"""Driving the arena page in Chromium: shared by the browser tests and scripts/arena_screenshot.py."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_TIMEOUT_MS = 30_000


def open_arena(browser, arena, *, max_tokens: int = 24, path: str = "/ui/"):
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    page.goto(arena.url + path)
    page.wait_for_function("document.querySelector('#base-info')?.innerText.includes('adapter(s) loaded')")
    for elem_id, value in (("temperature", 0), ("max-tokens", max_tokens)):
        box = page.locator(f"#{elem_id} input[type=number]")
        box.fill(str(value))
        box.press("Enter")
    return page


def ask(page, prompt: str) -> None:
    page.fill("#prompt textarea", prompt)
    page.click("#send")


def wait_answered(page, timeout_ms: int = ANSWER_TIMEOUT_MS) -> None:
    # Vote buttons turn on only once both panes finished with text (or stay off after an error).
    page.wait_for_selector("#vote-left:not([disabled])", timeout=timeout_ms)


def last_answer(page, pane: str) -> str:
    return page.locator(f"#{pane} [data-testid='bot']").last.inner_text().strip()
