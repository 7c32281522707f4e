import json

import pytest

from training.data import DataError, load_preferences, parse_rows

from .conftest import DATA


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def vote(v, **kw):
    row = {"format": "rahf-vote/1",
           "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
           "left": {"model": "base", "text": "L"}, "right": {"model": "aligned", "text": "R"},
           "vote": v, "time": "2026-01-01T00:00:00Z"}
    row.update(kw)
    return row


def test_shared_sharegpt_file_and_row_convention():
    train = load_preferences(str(DATA), "0:240")
    test = load_preferences(str(DATA), "240:300")
    assert (len(train.pairs), len(test.pairs)) == (240, 60)
    assert not train.skipped
    first = train.pairs[0]
    assert first.messages[-1][0] == "user" and first.chosen != first.rejected
    assert train.sha256 != test.sha256 and len(train.sha256) == 64


def test_votes_left_right_become_pairs_and_ties_are_counted(tmp_path):
    path = write_jsonl(tmp_path / "votes.jsonl",
                       [vote("left"), vote("right"), vote("tie"), vote("both_bad"), vote("maybe"), "{not json"])
    data = load_preferences(path)
    assert [(p.chosen, p.rejected) for p in data.pairs] == [("L", "R"), ("R", "L")]
    assert data.pairs[0].messages == (("system", "Be brief."), ("user", "Hi?"))
    assert data.skipped == {"no preference (tie/both_bad)": 2, "bad vote": 1, "not a JSON object": 1}
    assert "2 pairs from 6 rows" in data.summary()


def test_hh_rlhf_keeps_multi_turn_context(tmp_path):
    ctx = "\n\nHuman: hello\n\nAssistant: hi there\n\nHuman: tell me a joke"
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": ctx + "\n\nAssistant: a good joke", "rejected": ctx + "\n\nAssistant: no"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: DIFFERENT\n\nAssistant: c"},
        {"chosen": "no transcript here", "rejected": "x"}])
    data = load_preferences(path)
    assert len(data.pairs) == 1
    pair = data.pairs[0]
    assert pair.messages == (("user", "hello"), ("assistant", "hi there"), ("user", "tell me a joke"))
    assert (pair.chosen, pair.rejected) == ("a good joke", "no")
    assert data.skipped == {"chosen and rejected contexts differ": 1, "not an HH-RLHF transcript": 1}


def test_ultrafeedback_binarized_and_plain(tmp_path):
    uf = {"prompt": "Q?", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "good"}],
          "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "bad"}]}
    plain = {"prompt": "P?", "chosen": "yes", "rejected": "no", "system": "S"}
    path = write_jsonl(tmp_path / "mixed.jsonl", [uf, plain, {"prompt": "P", "chosen": "same", "rejected": "same"},
                                                  {"prompt": "P", "chosen": "", "rejected": "x"}])
    data = load_preferences(path)
    assert [p.messages for p in data.pairs] == [(("user", "Q?"),), (("system", "S"), ("user", "P?"))]
    assert [p.chosen for p in data.pairs] == ["good", "yes"]
    assert data.skipped == {"chosen equals rejected": 1, "empty response": 1}


def test_parquet_goes_through_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_list([{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(5)]).to_parquet(path)
    data = load_preferences(str(path), "1:3")
    assert [p.messages[-1][1] for p in data.pairs] == ["q1", "q2"]


def test_no_usable_rows_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "ties.jsonl", [vote("tie"), vote("both_bad")])
    with pytest.raises(DataError, match="no usable preference pairs.*2 no preference"):
        load_preferences(path)


def test_row_ranges():
    assert list(parse_rows("240:300", 300)) == list(range(240, 300))
    assert list(parse_rows(":2", 5)) == [0, 1] and list(parse_rows("3:", 5)) == [3, 4]
    with pytest.raises(DataError, match="START:STOP"):
        parse_rows("a-b", 5)
    assert list(parse_rows("-2:", 5)) == [3, 4] and list(parse_rows("0:5", 5)) == [0, 1, 2, 3, 4]
    with pytest.raises(DataError, match=r"the data has 5 rows \(0:5\)"):
        parse_rows("3:8", 5)
    with pytest.raises(DataError, match="the data has 5 rows"):
        parse_rows("6:", 5)
