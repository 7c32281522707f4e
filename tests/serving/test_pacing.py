"""The step pacer's arithmetic: what it allows before and after it has timed steps."""

from __future__ import annotations

import math

import pytest

from rahf_serve.errors import RahfError
from rahf_serve.pacing import StepPacer


def test_a_slowdown_of_one_or_less_is_refused():
    with pytest.raises(RahfError, match="above 1.0"):
        StepPacer(1.0)


def test_nothing_decoding_means_no_cap():
    assert StepPacer(2.0).allowance(0) == math.inf


def test_it_times_a_decode_only_step_then_probes_then_caps():
    pacer = StepPacer(2.0, smoothing=0.5)
    assert pacer.allowance(8) == 0  # no decode-only step timed yet: prompts sit this step out
    pacer.observe(8, 0, 0.100)
    assert pacer.allowance(8) == 8  # prompt work not timed yet: as much as the decoding rows' own
    pacer.observe(8, 8, 0.180)  # 8 units added 80 ms: 10 ms a unit
    assert pacer.allowance(8) == pytest.approx(10.0)  # (2 - 1) x 100 ms / 10 ms
    pacer.observe(8, 10, 0.400)  # 30 ms a unit now: averaged with the 10 ms before
    assert pacer.unit_seconds == pytest.approx(0.020)
    assert pacer.allowance(8) == pytest.approx(5.0)


def test_steps_without_decoding_rows_teach_nothing():
    pacer = StepPacer(3.0)
    pacer.observe(0, 500, 2.0)
    assert pacer.decode_seconds is None and pacer.unit_seconds is None


def test_the_cap_never_drops_below_one_unit():
    pacer = StepPacer(1.5)
    pacer.observe(4, 0, 0.010)
    pacer.observe(4, 1, 1.0)
    assert pacer.allowance(4) == 1.0
