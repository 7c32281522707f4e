"""Finding the prompt start two requests share (the engine's prefix sharing is tested in test_engine_kv.py)."""

from __future__ import annotations

import random

from rahf_serve.prefixes import best_donor, common_prefix


def brute(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_common_prefix_is_where_the_first_difference_lies():
    rng = random.Random(0)
    for _ in range(2000):
        shared = [rng.randrange(5) for _ in range(rng.randrange(0, 300))]
        a = shared + [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        b = shared + [rng.randrange(5) for _ in range(rng.randrange(0, 40))]
        want = brute(a, b)
        assert common_prefix(a, b) == want == common_prefix(tuple(b), a)
    assert common_prefix([], [1]) == 0 and common_prefix([1, 2], [1, 2]) == 2 and common_prefix([1], [2]) == 0


def test_best_donor_takes_the_longest_start_but_never_the_last_token():
    prompt = [1, 2, 3, 4]
    assert best_donor(prompt, []) == (None, 0)
    assert best_donor(prompt, [[9, 1], [2]]) == (None, 0)
    assert best_donor(prompt, [[1, 2, 9], [1, 2, 3, 9], [1, 2, 3, 8]]) == (1, 3)  # the first of the longest
    assert best_donor(prompt, [[1, 2], [1, 2, 3, 4, 5]]) == (1, 3)  # all four in common: three can be taken
    assert best_donor([7], [[7, 8]]) == (None, 0)  # a one-token prompt computes its only token
