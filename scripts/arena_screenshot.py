"""Screenshot of the arena on the real base and the shipped adapters, for docs/ui.png.

    python scripts/arena_screenshot.py --out docs/ui.png

Starts `rahf-serve` (the real CLI, embedded base, every bundle in adapters/) on a free loopback
port, opens /ui/ in headless Chromium (Debian's, as the browser tests use), picks the first
adapter, asks one prompt greedily, waits until both panes finished, saves the page and prints
both answers and the time they took, for the caption in docs/ui.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.ui import EXAMPLES  # noqa: E402
from tests.live import free_port, wait_until_up  # noqa: E402
from tests.ui.page import CHROMIUM, CHROMIUM_ARGS, ask, last_answer, open_arena, wait_answered  # noqa: E402


@dataclass
class Server:
    url: str


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    ap.add_argument("--prompt", default=EXAMPLES[0], help=f"default: the first example, {EXAMPLES[0]!r}")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--adapter-dir", default=str(ROOT / "adapters"))
    args = ap.parse_args()
    if not CHROMIUM.is_file():
        raise SystemExit(f"{CHROMIUM} not found: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [str(Path(sys.executable).with_name("rahf-serve")), "--port", str(port), "--adapter-dir",
               args.adapter_dir, "--votes", str(Path(tmp) / "votes.jsonl")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            server = Server(f"http://127.0.0.1:{port}")
            wait_until_up(server.url, proc, timeout=300)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
                page = open_arena(browser, server, max_tokens=args.max_tokens)
                adapter = page.locator("#adapters").inner_text().split("\n")[0]
                start = time.monotonic()
                ask(page, args.prompt)
                wait_answered(page, timeout_ms=300_000)
                seconds = time.monotonic() - start
                page.screenshot(path=str(args.out), full_page=True)
                print(f"saved {args.out}; prompt {args.prompt!r}; both panes done in {seconds:.1f} s")
                print(f"base: {last_answer(page, 'left-pane')!r}")
                print(f"{adapter}: {last_answer(page, 'right-pane')!r}")
                browser.close()
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
