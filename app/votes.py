"""Votes from the arena, appended to a JSONL file that `rahf-train` reads as preference pairs.

One line per vote, format `rahf-vote/1`:

    {"format": "rahf-vote/1",
     "messages": [{"role": "system|user|assistant", "content": "..."}, ..., {"role": "user", ...}],
     "left": {"model": "<name>", "text": "<left answer>"},
     "right": {"model": "<name or blend description>", "text": "<right answer>"},
     "vote": "left|right|tie|both_bad",
     "time": "<ISO-8601 UTC>"}

`left`/`right` votes are preference pairs (chosen, rejected); `tie` and `both_bad` are kept
because they are feedback too, and a loader may skip them.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

try:  # POSIX: also serialise appends from other processes (several servers, one file)
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock alone
    fcntl = None  # type: ignore[assignment]

FORMAT = "rahf-vote/1"
Vote = Literal["left", "right", "tie", "both_bad"]
VOTES: tuple[Vote, ...] = ("left", "right", "tie", "both_bad")
ROLES = ("system", "user", "assistant")


def vote_record(messages: Sequence[dict[str, str]], left: tuple[str, str], right: tuple[str, str],
                vote: Vote, *, time: datetime | None = None) -> dict[str, Any]:
    """Build one vote line; `left`/`right` are (model, text). Raises ValueError on a malformed vote."""
    if vote not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {vote!r}")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if not msgs or msgs[-1]["role"] != "user":
        raise ValueError("the messages of a vote must end with the user turn both answers reply to")
    if any(m["role"] not in ROLES or not isinstance(m["content"], str) for m in msgs):
        raise ValueError(f"every message needs a role in {ROLES} and text content")
    stamp = (time or datetime.now(timezone.utc)).isoformat(timespec="seconds")
    return {"format": FORMAT, "messages": msgs, "left": {"model": left[0], "text": left[1]},
            "right": {"model": right[0], "text": right[1]}, "vote": vote, "time": stamp}


class VoteStore:
    """Appends vote lines to one JSONL file and counts them; safe across threads and processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._counted: tuple[int, int, dict[str, int]] | None = None  # (size, mtime_ns, counts)

    def append(self, record: dict[str, Any]) -> None:
        # One write() of one whole line on an O_APPEND descriptor, under a lock: concurrent
        # voters never interleave halves of lines, and a crash leaves at most one partial line.
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(fd, line)
            finally:
                os.close(fd)  # closing releases the flock

    def counts(self) -> dict[str, int]:
        """Votes per kind in the file (re-read only when the file changed)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return dict.fromkeys(VOTES, 0)
        with self._lock:
            if self._counted and self._counted[:2] == (st.st_size, st.st_mtime_ns):
                return dict(self._counted[2])
            counts = dict.fromkeys(VOTES, 0)
            with self.path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        vote = json.loads(line).get("vote")
                    except ValueError:
                        continue  # a torn last line from a crash: not a vote
                    if vote in counts:
                        counts[vote] += 1
            self._counted = (st.st_size, st.st_mtime_ns, counts)
            return dict(counts)

    def summary(self) -> str:
        """One line for the UI: preference pairs first, since those are what training uses."""
        c = self.counts()
        pairs = c["left"] + c["right"]
        return (f"**{pairs}** preference pairs collected ({sum(c.values())} votes: "
                f"{c['left']} left, {c['right']} right, {c['tie']} tie, {c['both_bad']} both bad) "
                f"in `{self.path}`")
