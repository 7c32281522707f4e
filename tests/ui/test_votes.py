"""The votes file: exact line format, atomic appends, counts, and the training loader reading it."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import pytest

from app.votes import FORMAT, VoteStore, vote_record
from training.data import load_preferences

CONTEXT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]


def test_record_has_exactly_the_documented_fields():
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    rec = vote_record(CONTEXT, ("base", "hello"), ("blend(0.5*a + 0.5*b)", "hi!"), "right", time=when)
    assert rec == {"format": FORMAT, "messages": CONTEXT, "left": {"model": "base", "text": "hello"},
                   "right": {"model": "blend(0.5*a + 0.5*b)", "text": "hi!"}, "vote": "right",
                   "time": "2026-01-02T03:04:05+00:00"}
    assert FORMAT == "rahf-vote/1"


@pytest.mark.parametrize("messages, vote", [
    (CONTEXT, "maybe"),
    ([*CONTEXT, {"role": "assistant", "content": "x"}], "left"),  # must end with the user turn
    ([{"role": "tool", "content": "x"}, {"role": "user", "content": "q"}], "left"),
    ([], "tie"),
])
def test_malformed_votes_are_refused(messages, vote):
    with pytest.raises(ValueError):
        vote_record(messages, ("a", "x"), ("b", "y"), vote)


def test_concurrent_appends_never_interleave(tmp_path):
    store = VoteStore(tmp_path / "sub" / "votes.jsonl")
    long_text = "y" * 20_000  # bigger than a pipe buffer: a split write would show up as a broken line

    def voter(i: int) -> None:
        for _ in range(25):
            store.append(vote_record(CONTEXT, ("base", f"x{i}"), ("a", long_text), "left"))

    threads = [threading.Thread(target=voter, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = store.path.read_text().splitlines()
    assert len(lines) == 200
    assert all(json.loads(line)["right"]["text"] == long_text for line in lines)
    assert store.counts() == {"left": 200, "right": 0, "tie": 0, "both_bad": 0}


def test_counts_follow_the_file_and_skip_a_torn_line(tmp_path):
    store = VoteStore(tmp_path / "votes.jsonl")
    assert sum(store.counts().values()) == 0
    for vote in ("left", "right", "right", "tie", "both_bad"):
        store.append(vote_record(CONTEXT, ("base", "a"), ("x", "b"), vote))
    with store.path.open("a") as f:
        f.write('{"format": "rahf-vote/1", "vo')  # a crash mid-write
    assert store.counts() == {"left": 1, "right": 2, "tie": 1, "both_bad": 1}
    assert store.summary().startswith("**3** preference pairs")


def test_training_loader_reads_votes_as_pairs(tmp_path):
    store = VoteStore(tmp_path / "votes.jsonl")
    store.append(vote_record(CONTEXT, ("base", "meh"), ("aligned", "great"), "right"))
    store.append(vote_record(CONTEXT[1:], ("base", "good"), ("aligned", "bad"), "left"))
    store.append(vote_record(CONTEXT, ("base", "a"), ("aligned", "b"), "tie"))
    data = load_preferences(str(store.path))
    assert [(p.chosen, p.rejected) for p in data.pairs] == [("great", "meh"), ("good", "bad")]
    assert data.pairs[0].chat() == CONTEXT
    assert sum(data.skipped.values()) == 1
