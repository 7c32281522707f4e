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

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .kvcache import SlotCache
from .metrics import Counter
from .request import GenerationRequest


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


class Sharer(Protocol):
    """What `PrefixSharing` reads and sets on the engine's rows."""

    request: GenerationRequest
    fed: int
    """prompt tokens in the row's cache slot"""
    output: list[int]
    donor: Any
    """the row it takes its start from once that row holds it (None: none)"""
    shared: int
    """how many tokens it takes from `donor`"""
    cached: int
    """prompt tokens it took rather than computed"""


class PrefixSharing:
    """The engine's side of prefix sharing, over its `SlotCache`: what the kept slots hold, where a joining row
    takes its start from, and the copies. `selection(row)`: what a row's keys depend on besides its tokens
    (rows share only under equal selections); `taken`: counts the tokens taken, by adapter label."""

    def __init__(self, kv: SlotCache, selection: Callable[[Any], Hashable], taken: Counter) -> None:
        self.kv, self.selection, self.taken = kv, selection, taken
        self.kept: dict[int, Kept] = {}
        """what the cache's `kept` slots hold: finished rows' tokens, under their selection"""

    def join(self, rows: Sequence[Sharer], joining: list[Sharer], share: bool = True) -> list[Sharer]:
        """Occupy cache slots for `joining` after the running `rows`, each (when `share`) taking its start from
        a kept slot now or pointed at a donor row; returns `joining` in the order of its slots."""
        first = self.kv.rows
        end = first + len(joining)
        starts: list[tuple[int, int] | None] = [None] * len(joining)
        if share:
            joining = self._seat(joining, first)
            starts = [self._start(row, [*rows, *joining[:k]], first + k, end) for k, row in enumerate(joining)]
        self.kv.add(len(joining), starts)
        self.kept = {s: k for s, k in self.kept.items() if s in self.kv.kept}
        for row, start in zip(joining, starts, strict=True):
            if start is not None:
                self._took(row, start[1])
        return joining

    def take(self, rows: Sequence[Sharer]) -> set[int]:
        """Copy each waiting row's start from its donor once the donor holds it; returns the rows whose donor
        is still computing it (they feed nothing this step). A row whose donor left (finished, cancelled,
        failed) computes its prompt itself."""
        waiting: set[int] = set()
        if all(row.donor is None for row in rows):  # every step calls this; most have no one waiting
            return waiting
        at = {id(r): i for i, r in enumerate(rows)}
        for i, row in enumerate(rows):
            if row.donor is None:
                continue
            j = at.get(id(row.donor))
            if j is None or row.fed >= row.shared:
                row.donor = None
            elif row.donor.fed >= row.shared:  # prompt tokens lie first in a row's cache
                self.kv.copy_prefix(j, i, row.shared)
                self._took(row, row.shared)
                row.donor = None
            else:
                waiting.add(i)
        return waiting

    def left(self, leaving: dict[int, Sharer]) -> None:
        """Note what the rows `SlotCache.remove` just freed (by their indices before it) left in kept slots."""
        for i, slot in self.kv.left_in.items():
            row = leaving[i]
            tokens = (list(row.request.prompt_ids) + row.output)[:self.kv.kept[slot]]
            self.kept[slot] = Kept(self.selection(row), tokens)

    def forget(self, stale: Callable[[Hashable], bool] = lambda selection: True) -> None:
        """Drop what was kept under the selections `stale` says (all of them by default)."""
        self.kept = {s: k for s, k in self.kept.items() if not stale(k.selection)}

    def _start(self, row: Sharer, earlier: Sequence[Sharer], own: int, end: int) -> tuple[int, int] | None:
        """(kept slot, tokens) when a free slot holds the longest start of `row`'s prompt (to take slot `own`;
        the new rows end at `end`, and sources among the other new slots are about to be overwritten); else
        it points `row.donor` at the row of `earlier` it shares the most with, and returns None. A row that
        scores its prompt computes all of it."""
        if row.request.prompt_logprobs is not None:
            return None
        key = self.selection(row)
        alike = [r for r in earlier if self.selection(r) == key]
        live, shared = best_donor(row.request.prompt_ids, [r.request.prompt_ids for r in alike])
        slot, reused = self._best_kept(row, lambda s: s == own or s >= end)
        if slot is not None and reused >= shared:
            return slot, reused
        if live is not None:
            row.donor, row.shared = alike[live], shared
        return None

    def _best_kept(self, row: Sharer, allowed: Callable[[int], bool]) -> tuple[int | None, int]:
        """The `allowed` kept slot holding the longest start of `row`'s prompt under its selection, and how
        many tokens of it; (None, 0) when none does (or the row scores its prompt)."""
        if row.request.prompt_logprobs is not None:
            return None, 0
        key = self.selection(row)
        slots = [s for s, k in self.kept.items() if k.selection == key and allowed(s)]
        held, reused = best_donor(row.request.prompt_ids, [self.kept[s].tokens for s in slots])
        return (None, 0) if held is None else (slots[held], reused)

    def _seat(self, joining: list[Sharer], first: int) -> list[Sharer]:
        """`joining` reordered so that a row whose prompt start is kept in one of the slots the joining rows
        are about to take sits in that slot: nothing to copy, and no other new row overwrites it first (two
        chats' next turns, say, each in the slot the other's last turn left)."""
        end, seats = first + len(joining), {}
        for row in joining:
            slot, _ = self._best_kept(row, lambda s: first <= s < end and s not in seats)
            if slot is not None:
                seats[slot] = row
        rest = iter([r for r in joining if all(r is not seated for seated in seats.values())])
        return [seats[s] if s in seats else next(rest) for s in range(first, end)]

    def _took(self, row: Sharer, upto: int) -> None:
        """`row` holds its prompt's first `upto` tokens, taken rather than computed."""
        self.taken.inc(upto - row.fed, adapter=row.request.label)
        row.cached += upto - row.fed
        row.fed = upto
