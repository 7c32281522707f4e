"""Preference data: every supported format becomes a list of `Pair`s through `load_preferences`.

Formats are recognised per row, so one file may even mix them:
- sharegpt preference: {"conversations": [{"from", "value"}...], "chosen": {...}, "rejected": {...}}
- UltraFeedback-binarized: {"chosen": [messages], "rejected": [messages]} (+ optional "prompt")
- HH-RLHF: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
- plain: {"prompt": "...", "chosen": "...", "rejected": "..."} (+ optional "system")
- UI votes: {"format": "rahf-vote/1", "messages": [...], "left": {...}, "right": {...}, "vote": ...}
Malformed rows are skipped and counted by reason; no usable row at all is an error.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Message = dict[str, str]
_ROLES = {"system", "user", "assistant"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


class DataError(ValueError):
    """Preference data that cannot be used at all."""


class Skip(Exception):
    """One malformed row; its message is the reason counted in the summary."""


@dataclass(frozen=True)
class Pair:
    """A context (ending with a user turn) with a preferred and a dispreferred assistant reply."""

    messages: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str

    def chat(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]


@dataclass
class PreferenceData:
    pairs: list[Pair]
    source: str
    rows: str | None
    total_rows: int
    skipped: Counter = field(default_factory=Counter)
    """reason -> rows skipped (malformed rows and votes without a preference)"""
    source_rows: int = 0
    """rows in the whole source, malformed ones included (what `rows` ranges index)"""

    @property
    def sha256(self) -> str:
        canon = json.dumps([[p.messages, p.chosen, p.rejected] for p in self.pairs], ensure_ascii=False)
        return hashlib.sha256(canon.encode()).hexdigest()

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return f"{len(self.pairs)} pairs from {self.total_rows} rows of {self.source} (skipped: {skipped})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.source, "rows": self.rows, "pairs": len(self.pairs), "sha256": self.sha256,
                "skipped": dict(self.skipped)}


def parse_rows(spec: str | None, n: int) -> range:
    """'a:b' (Python slice semantics, either side optional) as a range over n rows. A bound past the
    end is an error, not clipped: rows a user names and silently does not get (a validation slice
    that comes back short or empty) are worse than a refusal."""
    if spec is None:
        return range(n)
    try:
        start, _, stop = spec.partition(":")
        bounds = (int(start) if start else None, int(stop) if stop else None)
    except ValueError as err:
        raise DataError(f"--rows {spec!r}: expected START:STOP, e.g. 0:240") from err
    past = [b for b in bounds if b is not None and b > n]
    if past:
        raise DataError(f"--rows {spec!r}: the data has {n} rows (0:{n})")
    return range(n)[slice(*bounds)]


def load_preferences(source: str, rows: str | None = None, split: str | None = None) -> PreferenceData:
    """Pairs from a local file (.json, .jsonl, .parquet, .csv) or folder, or a Hub data set name."""
    raw = _read_rows(source, split)
    selected = parse_rows(rows, len(raw))
    data = PreferenceData([], source, rows, len(selected), source_rows=len(raw))
    for i in selected:
        try:
            data.pairs.append(parse_row(raw[i]))
        except Skip as why:
            data.skipped[str(why)] += 1
    if not data.pairs:
        raise DataError(f"no usable preference pairs in {source} rows {rows or 'all'}: {data.summary()}")
    return data


def _read_rows(source: str, split: str | None) -> list[Any]:
    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if stripped.startswith("["):
            return json.loads(stripped)
        rows: list[Any] = []
        for line in text.splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    rows.append(None)  # counted as malformed, not fatal
        return rows
    import datasets

    try:
        if path.is_file():  # .parquet, .csv, ...: datasets names its builders after the suffix
            loaded = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split=split or "train")
        else:  # a local data set folder or a Hub data set name
            loaded = datasets.load_dataset(source, split=split or "train")
    except Exception as err:  # datasets raises many types: name them all in one message
        raise DataError(f"cannot load preference data {source!r}: {err}") from err
    return list(loaded)


def parse_row(row: Any) -> Pair:
    if not isinstance(row, dict):
        raise Skip("not a JSON object")
    if row.get("format") == "rahf-vote/1":
        return _vote(row)
    if "conversations" in row:
        return _sharegpt(row)
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _message_lists(chosen, rejected, row.get("prompt"))
    if isinstance(chosen, str) and isinstance(rejected, str):
        if "prompt" in row:
            return _plain(row)
        return _hh(chosen, rejected)
    raise Skip("unknown format")


def _pair(messages: Iterable[Message], chosen: Any, rejected: Any) -> Pair:
    turns = []
    for m in messages:
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES or not isinstance(content, str):
            raise Skip("bad message")
        turns.append((role, content))
    if not turns or turns[-1][0] != "user":
        raise Skip("context does not end with a user turn")
    if not isinstance(chosen, str) or not isinstance(rejected, str) or not chosen.strip() or not rejected.strip():
        raise Skip("empty response")
    if chosen == rejected:
        raise Skip("chosen equals rejected")
    return Pair(tuple(turns), chosen, rejected)


def _vote(row: dict[str, Any]) -> Pair:
    vote = row.get("vote")
    if vote in ("tie", "both_bad"):
        raise Skip("no preference (tie/both_bad)")
    if vote not in ("left", "right"):
        raise Skip("bad vote")
    left, right = row.get("left"), row.get("right")
    if not isinstance(left, dict) or not isinstance(right, dict) or not isinstance(row.get("messages"), list):
        raise Skip("bad vote")
    winner, loser = (left, right) if vote == "left" else (right, left)
    return _pair(row["messages"], winner.get("text"), loser.get("text"))


def _sharegpt(row: dict[str, Any]) -> Pair:
    conv, chosen, rejected = row.get("conversations"), row.get("chosen"), row.get("rejected")
    if not isinstance(conv, list) or not isinstance(chosen, dict) or not isinstance(rejected, dict):
        raise Skip("bad sharegpt row")
    try:
        messages = [{"role": _SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in conv]
    except (KeyError, TypeError):
        raise Skip("bad message") from None
    return _pair(messages, chosen.get("value"), rejected.get("value"))


def _message_lists(chosen: list[Any], rejected: list[Any], prompt: Any) -> Pair:
    if not chosen or not rejected or not all(isinstance(m, dict) for m in chosen + rejected):
        raise Skip("bad message")
    if chosen[:-1] != rejected[:-1]:
        raise Skip("chosen and rejected contexts differ")
    last_c, last_r = chosen[-1], rejected[-1]
    if last_c.get("role") != "assistant" or last_r.get("role") != "assistant":
        raise Skip("last message is not the assistant's")
    context = chosen[:-1] or ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else [])
    return _pair(context, last_c.get("content"), last_r.get("content"))


def _plain(row: dict[str, Any]) -> Pair:
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip("empty prompt")
    system = row.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
    return _pair(messages + [{"role": "user", "content": prompt}], row["chosen"], row["rejected"])


def _hh_turns(text: str) -> list[Message]:
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise Skip("not an HH-RLHF transcript")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]


def _hh(chosen: str, rejected: str) -> Pair:
    c, r = _hh_turns(chosen), _hh_turns(rejected)
    if c[:-1] != r[:-1]:
        raise Skip("chosen and rejected contexts differ")
    if c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        raise Skip("last message is not the assistant's")
    return _pair(c[:-1], c[-1]["content"], r[-1]["content"])
