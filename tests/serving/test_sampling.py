"""Sampling and incremental text with stop strings."""

from __future__ import annotations

import pytest
import torch

from rahf_serve.sampling import SamplingParams, TextStream, make_generator, sample_rows


def stream_text(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], bool]:
    ts = TextStream(tokenizer, stop)
    deltas, stopped = [], False
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta, stopped = ts.push(token)
        deltas.append(delta)
        if stopped:
            break
    if not stopped:
        deltas.append(ts.flush())
    return deltas, stopped


@pytest.mark.parametrize("text, stop, expected, stopped", [
    ("Hello world, how are you?", (), "Hello world, how are you?", False),
    ("Hello world, how are you?", ("how",), "Hello world, ", True),
    ("Hello world, how are you?", ("world", "Hello"), "", True),
    ("Hello world, how are you?", ("xyz",), "Hello world, how are you?", False),
    ("Hello world, how are you?", ("you?!",), "Hello world, how are you?", False),
    ("naïve café ☕ ok", ("ok",), "naïve café ☕ ", True),
])
def test_text_stream_stops_and_never_leaks_a_stop(tokenizer, text, stop, expected, stopped):
    deltas, was_stopped = stream_text(tokenizer, text, stop)
    assert "".join(deltas) == expected
    assert was_stopped is stopped
    assert all("\ufffd" not in d for d in deltas)


def test_greedy_rows_take_argmax_and_sampled_rows_use_their_generator():
    logits = torch.tensor([[0.0, 5.0, 1.0], [0.0, 0.0, 0.0]])
    greedy, hot = SamplingParams(temperature=0), SamplingParams(temperature=1.0, seed=3)
    draws = [sample_rows(logits, [greedy, hot], [make_generator(None, torch.device("cpu")),
                                                 make_generator(3, torch.device("cpu"))]) for _ in range(2)]
    assert draws[0] == draws[1] and draws[0][0] == 1


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    p = SamplingParams(temperature=1.0, top_p=0.5)
    gen = make_generator(0, torch.device("cpu"))
    assert {sample_rows(logits, [p], [gen])[0] for _ in range(50)} == {0}
    p = SamplingParams(temperature=1.0, top_p=0.85)
    assert {sample_rows(logits, [p], [gen])[0] for _ in range(200)} == {0, 1}


def test_a_request_is_checked_without_an_engine():
    from rahf_serve.errors import InvalidRequest, RequestTooLarge
    from rahf_serve.request import GenerationRequest, Limits, check_request

    limits = Limits(vocab_size=100, max_new_tokens=16, max_model_len=20)
    check_request(GenerationRequest([1, 2, 3], SamplingParams(max_tokens=16)), limits)
    for bad, error in (([], InvalidRequest), ([100], InvalidRequest), ([-1], InvalidRequest)):
        with pytest.raises(error):
            check_request(GenerationRequest(bad, SamplingParams(max_tokens=4)), limits)
    with pytest.raises(RequestTooLarge, match="max-model-len"):
        check_request(GenerationRequest([1] * 5, SamplingParams(max_tokens=16)), limits)
    with pytest.raises(RequestTooLarge, match="limit of 16"):
        check_request(GenerationRequest([1], SamplingParams(max_tokens=17)), limits)
