"""Prompt starts that rows can share instead of each computing them.

Two rows under the same adapter (or blend) and steering whose prompts begin with the same tokens hold the
same keys and values for those tokens. A row joining the batch takes the longest such start from a row
already there (running, or joining before it), copying those tokens' keys and values once that row has
them in its cache, or from a free cache slot that still holds a finished row's (`Kept`: prompt and answer,
so a chat's next turn finds its history there), and feeds only the rest of its prompt. A shared system
prompt, or the same question asked of one adapter by many clients, is then computed once. All but the
prompt's last token can be shared: that token's logits give the row its first token.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Kept:
    """What a free cache slot still holds: the keys and values of `tokens`, computed under `selection` (the
    engine's key for an adapter or blend and a steering)."""

    selection: Hashable
    tokens: list[int]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common, found by halving (each comparison one slice
    compare: a few microseconds for prompts of thousands of tokens)."""
    if type(a) is not type(b):  # a list never equals a tuple
        a, b = list(a), list(b)
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo]; the first difference lies in [lo, hi)
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def best_donor(prompt: Sequence[int], candidates: Sequence[Sequence[int]]) -> tuple[int | None, int]:
    """(index of the candidate prompt whose start `prompt` shares longest, how many tokens it can take
    from it): at most all but `prompt`'s last token; the first candidate wins a tie; (None, 0) when none
    shares a token."""
    best, most = None, 0
    for i, other in enumerate(candidates):
        n = min(common_prefix(prompt, other), len(prompt) - 1)
        if n > most:
            best, most = i, n
    return best, most
