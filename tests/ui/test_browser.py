"""The arena in a real headless Chromium against the real rahf-serve app (tiny model, two adapters).

Greedy decoding (temperature 0) makes the base and the adapter answer differently only because
of the adapter. Set UI_SCREENSHOT=path to keep the screenshot of the first test.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from rahf_serve.models import load_base
from tests.helpers import random_lora_bundle
from tests.ui.page import ANSWER_TIMEOUT_MS, ask, last_answer, open_arena, wait_answered
from tests.ui.server import serve_arena
from training.data import load_preferences

pytestmark = pytest.mark.timeout(180)
# Records every text the last bot message of each pane shows, to prove the text arrived in pieces.
WATCH_STREAMS = """() => {
  window.__seen = {"left-pane": [], "right-pane": []};
  for (const id of Object.keys(window.__seen)) {
    new MutationObserver(() => {
      const bots = document.querySelectorAll(`#${id} [data-testid="bot"]`);
      const text = bots.length ? bots[bots.length - 1].innerText.trim() : "";
      const seen = window.__seen[id];
      if (text && seen[seen.length - 1] !== text) seen.push(text);
    }).observe(document.getElementById(id), {subtree: true, childList: true, characterData: true});
  }
}"""


@contextmanager
def peak_batch(arena) -> Iterator[list[int]]:
    """The largest running batch the engine reported meanwhile (its `rahf_running_requests` gauge)."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], int(arena.registry.engine.metrics.running.current))
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        yield peak
    finally:
        done.set()
        watcher.join()


def votes(arena) -> list[dict]:
    return [json.loads(line) for line in arena.votes.read_text().splitlines()] if arena.votes.exists() else []


def test_both_panes_stream_different_answers_and_a_vote_becomes_a_training_pair(browser, arena, tmp_path):
    page = open_arena(browser, arena)
    assert "kind" in page.locator("#adapters").inner_text()  # the first adapter is picked on load
    page.evaluate(WATCH_STREAMS)
    with peak_batch(arena) as peak:
        ask(page, "Tell me about llamas.")
        wait_answered(page)
    assert peak[0] >= 2, "the two panes were not decoded in one batch"
    left, right = last_answer(page, "left-pane"), last_answer(page, "right-pane")
    assert left and right and left != right
    seen = page.evaluate("window.__seen")
    assert len(seen["left-pane"]) > 1 and len(seen["right-pane"]) > 1, f"no streaming seen: {seen}"

    page.click("#vote-right")
    counted = "document.querySelector('#vote-count').innerText.startsWith('1 preference pair')"
    try:
        page.wait_for_function(counted)
    except Exception as err:  # keep what tells why, should a vote ever go unanswered again
        page.screenshot(path=str(tmp_path / "vote-not-counted.png"), full_page=True)
        state = {b: page.locator(f"#vote-{b}").is_disabled() for b in ("left", "right", "tie", "both_bad")}
        raise AssertionError(f"the vote was not counted: count {page.locator('#vote-count').inner_text()!r}, "
                             f"buttons disabled {state}, votes file {votes(arena)}, screenshot in {tmp_path}") from err
    assert page.locator("#vote-left").is_disabled()  # one vote per answer
    page.screenshot(path=os.environ.get("UI_SCREENSHOT") or str(tmp_path / "ui.png"), full_page=True)

    [line] = votes(arena)
    assert set(line) == {"format", "messages", "left", "right", "vote", "time"}
    assert line["format"] == "rahf-vote/1" and line["vote"] == "right"
    assert line["messages"] == [{"role": "user", "content": "Tell me about llamas."}]
    assert line["left"]["model"] == arena.registry.engine.base.name and line["right"]["model"] == "kind"
    assert line["left"]["text"] and line["left"]["text"] != line["right"]["text"]
    [pair] = load_preferences(str(arena.votes)).pairs
    assert (pair.chosen, pair.rejected) == (line["right"]["text"], line["left"]["text"])

    # Multi-turn: the follow-up is answered by both panes, each with its own history.
    ask(page, "And alpacas?")
    wait_answered(page)
    assert page.locator("#left-pane [data-testid='bot']").count() == 2
    assert page.locator("#right-pane [data-testid='bot']").count() == 2
    page.context.close()


def test_two_browser_sessions_chat_at_once(browser, arena):
    pages = [open_arena(browser, arena, max_tokens=32) for _ in range(2)]
    for i, page in enumerate(pages):
        ask(page, f"Session {i} says hello.")
    for page in pages:
        wait_answered(page)
        assert last_answer(page, "left-pane") and last_answer(page, "right-pane")
    # Each session kept its own conversation.
    assert "Session 1" not in pages[0].locator("#left-pane").inner_text()
    for page in pages:
        page.context.close()


def test_adapters_hot_loaded_and_removed_through_the_api(browser, arena, arena_model_dir):
    random_lora_bundle(load_base(str(arena_model_dir), device="cpu", dtype="float32"),
                       arena.adapter_dir / "fresh", seed=7)
    page = open_arena(browser, arena)
    api = httpx.Client(base_url=arena.url, timeout=30)
    assert api.post("/v1/adapters", json={"name": "fresh", "source": "fresh"}).status_code == 201

    page.click("#refresh")
    page.locator("#adapters input").click()
    page.get_by_role("option", name="fresh").click()
    page.keyboard.press("Escape")
    page.wait_for_selector("#blend", state="visible")  # two adapters picked: their blend weights
    ask(page, "Blend, please.")
    wait_answered(page)
    assert last_answer(page, "right-pane")

    assert api.delete("/v1/adapters/fresh").status_code == 200
    ask(page, "Still there?")
    page.wait_for_function("document.querySelector('#right-pane').innerText.includes('not loaded')",
                           timeout=ANSWER_TIMEOUT_MS)
    page.wait_for_function(  # the base still answers; the picker drops the removed adapter on its own
        "!document.querySelector('#adapters').innerText.includes('fresh')", timeout=ANSWER_TIMEOUT_MS)
    assert last_answer(page, "left-pane")

    ask(page, "And now?")
    wait_answered(page)
    assert "not loaded" not in last_answer(page, "right-pane")
    page.context.close()


def test_with_an_api_key_the_page_needs_it_once_and_the_ui_answers(browser, arena_model_dir, tmp_path):
    with serve_arena(tmp_path, arena_model_dir, api_key="s3cret") as guarded:
        page = browser.new_context().new_page()
        assert page.goto(guarded.url + "/ui/").status == 401
        page.context.close()
        page = open_arena(browser, guarded, path="/ui/?api_key=s3cret")  # once; a cookie keeps it
        ask(page, "Hello with a key.")
        wait_answered(page)
        assert last_answer(page, "right-pane")
        page.context.close()
