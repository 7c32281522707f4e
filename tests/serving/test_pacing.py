"""The step pacer's arithmetic: what it allows before and after it has timed steps."""

from __future__ import annotations

import pytest

from rahf_serve.errors import RahfError
from rahf_serve.pacing import StepPacer, chunk_keys

PRIOR = 1 / 3000  # a key's cost over a token's, as kvcache.key_cost gives for a small model


def test_a_slowdown_of_one_or_less_is_refused():
    with pytest.raises(RahfError, match="above 1.0"):
        StepPacer(1.0, PRIOR)


def test_nothing_decoding_means_no_cap():
    assert StepPacer(2.0, PRIOR).caps(0, [100]) is None


def test_chunk_keys_counts_the_context_and_the_causal_triangle():
    assert chunk_keys(0, 1) == 1 and chunk_keys(10, 1) == 11
    assert chunk_keys(10, 3) == 11 + 12 + 13


def test_it_times_a_decode_only_step_then_probes_then_caps():
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5)
    assert pacer.caps(8, [0]) == [0]  # no decode-only step timed yet: prompts sit this step out
    pacer.observe(8, 0, 0, 0.100)
    assert pacer.caps(8, [0]) == [7]  # chunk not timed yet: the decoding rows' own work (8 / (1 + 8 x PRIOR))
    pacer.observe(8, 8, chunk_keys(0, 8), 0.180)  # one chunk: the prior's ratio splits its 80 ms
    token, key = pacer.costs()
    assert key / token == pytest.approx(PRIOR, rel=1e-3)
    assert token * 8 + key * chunk_keys(0, 8) == pytest.approx(0.080, rel=1e-3)


def test_it_learns_what_a_key_costs_from_chunks_at_different_contexts():
    # this machine: 4 ms a token, 2 us a key (a key costs 1/2000 of a token, not the prior's 1/3000)
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5, quantile=0.0)  # aim at the bound: the fit alone
    pacer.observe(8, 0, 0, 0.100)
    for ctx, n in ((0, 16), (1000, 12), (2000, 8), (3000, 6)):
        keys = chunk_keys(ctx, n)
        pacer.observe(8, n, keys, 0.100 + 0.004 * n + 2e-6 * keys)
    token, key = pacer.costs()
    assert token == pytest.approx(0.004, rel=1e-3) and key == pytest.approx(2e-6, rel=1e-3)
    # each cap is the largest chunk that adds at most (2 - 1) x 100 ms at its context
    for ctx, cap in zip((0, 4000), pacer.caps(8, [0, 4000]), strict=True):
        spent = lambda n, ctx=ctx: 0.004 * n + 2e-6 * chunk_keys(ctx, n)  # noqa: E731
        assert spent(cap) <= 0.050 < spent(cap + 1)  # two rows share the 100 ms
    assert pacer.caps(8, [4000])[0] < pacer.caps(8, [0])[0]


def test_predictions_that_miss_move_the_aim_below_the_bound():
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5, quantile=0.9, refresh_every=0)  # the aim alone
    pacer.observe(8, 0, 0, 0.100)
    pacer.observe(8, 20, chunk_keys(0, 20), 0.180)  # the first chunk sets the costs; nothing was predicted yet
    assert not pacer.misses and pacer.miss_factor() == pacer.prior_miss == 1.15  # nothing seen: the prior
    first = pacer.caps(8, [100])[0]
    # nine steps as predicted, then one 20% over, ten times: the 90% quantile of the misses is the slow ones'
    keys = chunk_keys(0, 20)
    for _ in range(10):
        for miss in (1.0,) * 9 + (1.2,):
            token, key = pacer.costs()
            pacer.observe(8, 20, keys, 0.100 * (1 + (token * 20 + key * keys) / pacer.decode_seconds) * miss)
    assert pacer.miss_factor() == pytest.approx(1.2, rel=0.02)
    token, key = pacer.costs()
    aimed = pacer.caps(8, [100])[0]
    assert aimed < first
    spent = lambda n: token * n + key * chunk_keys(100, n)  # noqa: E731
    assert spent(aimed) <= (2.0 / pacer.miss_factor() - 1.0) * 0.100 < spent(aimed + 1)
    for seconds in (0.180, 1.0) * 20:  # a wild spell: the aim stops at a quarter of the allowance
        pacer.observe(8, 20, chunk_keys(0, 20), seconds)
    assert pacer.miss_factor() > 2
    token, key = pacer.costs()
    floor = pacer.caps(8, [100])[0]
    spent = lambda n: token * n + key * chunk_keys(100, n)  # noqa: E731
    assert floor == 1 or spent(floor) <= 0.25 * 0.100 < spent(floor + 1)


def test_a_slow_step_lowers_the_next_steps_aim_until_one_runs_as_predicted():
    """A shared machine's slow spells last several steps: the step after a slow one aims below its miss, and
    one step on time returns the aim to the quantile of recent misses."""
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5, quantile=0.9, warmup=0, refresh_every=0)
    pacer.observe(8, 0, 0, 0.100)
    keys = chunk_keys(0, 20)

    def step(miss: float) -> None:
        token, key = pacer.costs()
        pacer.observe(8, 20, keys, 0.100 * (1 + (token * 20 + key * keys) / pacer.decode_seconds) * miss)

    pacer.observe(8, 20, keys, 0.180)
    for _ in range(20):
        step(1.0)
    assert pacer.miss_factor() == pytest.approx(1.0)
    calm = pacer.caps(8, [100])[0]
    step(1.5)
    assert pacer.miss_factor() == pytest.approx(1.5)  # one slow step in 22: far above the 90% quantile
    token, key = pacer.costs()
    wary = pacer.caps(8, [100])[0]
    spent = lambda n: token * n + key * chunk_keys(100, n)  # noqa: E731
    assert wary < calm and spent(wary) <= (2.0 / 1.5 - 1.0) * 0.100 < spent(wary + 1)
    step(1.0)
    assert pacer.miss_factor() == pytest.approx(1.0)
    pacer.follow_latest = False
    step(1.5)
    assert pacer.miss_factor() == pytest.approx(1.0)


def test_until_it_has_seen_enough_misses_the_pacer_assumes_the_prior():
    """With no history the aim is below the bound by `prior_miss`, not at it; once `warmup` predictions were
    timed, their quantile alone decides (here they were exact: the aim returns to the bound)."""
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5, prior_miss=1.25, warmup=4, refresh_every=0)
    pacer.observe(8, 0, 0, 0.100)
    pacer.observe(8, 20, chunk_keys(0, 20), 0.180)
    token, key = pacer.costs()
    spent = lambda n: token * n + key * chunk_keys(100, n)  # noqa: E731
    cautious = pacer.caps(8, [100])[0]
    assert spent(cautious) <= (2.0 / 1.25 - 1.0) * 0.100 < spent(cautious + 1)
    for _ in range(4):
        assert pacer.miss_factor() == 1.25
        token, key = pacer.costs()
        pacer.observe(8, 20, chunk_keys(0, 20), 0.100 * (1 + (token * 20 + key * chunk_keys(0, 20)) / 0.100))
    assert len(pacer.misses) == 4 and pacer.miss_factor() == pytest.approx(1.0)
    assert pacer.caps(8, [100])[0] > cautious
    assert StepPacer(2.0, PRIOR, quantile=0.0).miss_factor() == 1.0  # aiming at the bound ignores the prior

def test_a_quantile_outside_zero_to_one_is_refused():
    with pytest.raises(RahfError, match="quantile"):
        StepPacer(2.0, PRIOR, quantile=1.5)


def test_prompts_sit_a_step_out_to_time_the_decode_only_step_again():
    pacer = StepPacer(2.0, PRIOR, smoothing=0.5, refresh_every=3)
    pacer.observe(8, 0, 0, 0.100)
    for _ in range(3):
        assert pacer.caps(8, [100, 200]) != [0, 0]
        pacer.observe(8, 10, chunk_keys(100, 10), 0.150)
    assert pacer.caps(8, [100, 200]) == [0, 0]  # due: this step decodes only
    # the streams' contexts grew: a decode-only step now takes 140 ms, and the chunks are measured against it
    pacer.observe(8, 0, 0, 0.180)
    assert pacer.decode_seconds == pytest.approx(0.140)
    assert pacer.caps(8, [100, 200]) != [0, 0]
    pacer.observe(8, 10, chunk_keys(100, 10), 0.190)
    assert pacer.steps[-1].took == pytest.approx(0.190 / 0.140)
    assert pacer.caps(0, [100]) is None  # nothing decodes: no step to time, no sitting out


def test_each_chunked_step_is_kept_with_its_prediction():
    pacer = StepPacer(2.0, PRIOR)
    pacer.observe(8, 0, 0, 0.100)  # decode-only: not a paced step
    pacer.observe(8, 20, chunk_keys(0, 20), 0.180)  # the probe: nothing to predict with yet
    token, key = pacer.costs()
    pacer.observe(8, 30, chunk_keys(20, 30), 0.250)
    probe, paced = pacer.steps
    assert probe.predicted is None and probe.took == pytest.approx(1.8) and probe.tokens == 20
    assert paced.took == pytest.approx(2.5)
    assert paced.predicted == pytest.approx(1 + (token * 30 + key * chunk_keys(20, 30)) / 0.100)
    assert paced.keys == chunk_keys(20, 30)


def test_steps_without_decoding_rows_teach_nothing():
    pacer = StepPacer(3.0, PRIOR)
    pacer.observe(0, 500, chunk_keys(0, 500), 2.0)
    assert pacer.decode_seconds is None and pacer.costs() is None


def test_the_cap_never_drops_below_one_token():
    pacer = StepPacer(1.5, PRIOR)
    pacer.observe(4, 0, 0, 0.010)
    pacer.observe(4, 1, chunk_keys(5000, 1), 1.0)
    assert pacer.caps(4, [5000, 6000]) == [1, 1]
