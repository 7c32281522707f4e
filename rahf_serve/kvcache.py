"""A preallocated KV cache for the running batch: one slot per row, written in place, and its attention.

Every layer's keys and values live in one tensor allocated once, [layers, 2, max_rows, kv_heads,
max_len, head_dim]. The running batch occupies slots 0..rows-1. When a row leaves, the last row
moves into its slot (one row copied, up to its own length), so the occupied slots stay contiguous; a
leaving row's keys and values stay behind in a free slot (`kept`: its own when it was last, else the moved
row's when it was no longer than that row) for a row that starts the same way to take, until the slot is
occupied again.

A step packs every row's new tokens into one sequence, [1, total]: decode rows feed one token, prefilling
rows a prompt chunk, and nothing is padded, so the model's Linear layers (most of the cost) run once over
exactly the step's tokens. Attention is the one part that must stay per row: while a step runs, the
model's attention implementation is this module's (`SlotCache.attending`), which reads each row's keys
as a view of its slot, one scaled-dot-product call for a run of consecutive decode rows and one for each
prompt chunk. Nothing is concatenated per step and nothing is copied when a row joins.

Only plain full attention is supported (the llama family); `check_supported` refuses other models
rather than let them answer wrongly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from . import huge_pages
from .errors import BaseModelError, QueueFull, RequestTooLarge

if TYPE_CHECKING:
    from .forward_kernel import ForwardKernel

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose attention writes the cache only through `Cache.update` and attends through the
configured attention function (each is checked against transformers' own DynamicCache by the tests)."""
ATTENTION = "rahf_slot_cache"
"""The attention implementation a model runs with inside `SlotCache.attending`."""


class UnsupportedModelError(BaseModelError):
    """The base model's attention is not plain full attention, so this cache would serve it wrongly."""

    code = "unsupported_kv_cache"


class ContextFull(RequestTooLarge):
    """A row would hold more tokens than its cache slot: end it with finish_reason "length" or a 400."""


class SlotsFull(QueueFull):
    """Every cache slot holds a running row."""


@dataclass(frozen=True)
class KVShape:
    """The per-layer cache geometry of a model."""

    layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> KVShape:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(int(config.num_hidden_layers), int(getattr(config, "num_key_value_heads", None) or heads),
                   int(head_dim))

    def bytes(self, max_rows: int, max_len: int, dtype: torch.dtype) -> int:
        """Memory for keys and values of `max_rows` slots of `max_len` tokens."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * max_rows * self.kv_heads * max_len * self.head_dim * itemsize


def kv_cache_bytes(config: Any, max_rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes a SlotCache of this size takes for a model with this config (for sizing from a memory budget)."""
    return KVShape.of(config).bytes(max_rows, max_len, dtype)


def key_cost(config: Any) -> float:
    """The compute of attending to one cached key, as a fraction of one token's pass through the Linear
    layers (FLOPs: 4 x heads x head_dim per key against 2 x the Linear weights per token, per layer).
    SmolLM2-135M: 1/3072, so a query at 4,000 tokens of context costs 2.3 tokens."""
    shape = KVShape.of(config)
    heads, hidden = int(config.num_attention_heads), int(config.hidden_size)
    inter = int(getattr(config, "intermediate_size", 4 * hidden))
    linear = hidden * heads * shape.head_dim * 2 + hidden * shape.kv_heads * shape.head_dim * 2 + 3 * hidden * inter
    return (4 * heads * shape.head_dim) / (2 * linear)


def check_supported(config: Any, max_len: int) -> None:
    """Raise UnsupportedModelError naming the model type and the reason unless the cache serves it exactly."""
    kind = getattr(config, "model_type", "?")

    def refuse(reason: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"base model type {kind!r} is not supported by the slot KV cache: {reason}")

    if kind not in SUPPORTED_MODEL_TYPES:
        raise refuse(f"only {', '.join(SUPPORTED_MODEL_TYPES)} attention is verified to read the cache as written")
    other = sorted({t for t in getattr(config, "layer_types", None) or () if t != "full_attention"})
    window = getattr(config, "sliding_window", None)
    # A window at least as long as the longest row never hides a key, so it is full attention here.
    if (other or window is not None) and (window is None or max_len > window):
        what = f"layer types {other}" if other else "sliding-window attention"
        raise refuse(f"{what} (window {window}) over rows of up to {max_len} tokens; "
                     "only full attention is supported")


@dataclass(frozen=True)
class _Group:
    """Queries that attend in one call: a run of consecutive rows feeding one token each (`decode`), or
    the prompt chunk of one row."""

    tokens: slice
    """their positions in the step's packed sequence"""
    rows: slice
    """their slots"""
    width: int
    """keys read: the longest of these rows after the step"""
    mask: torch.Tensor | None
    """[rows, 1, queries, width], True where a query may attend; None when every query sees every key
    (decode rows of one length), which spares the attention a mask per call"""
    decode: bool


@dataclass(frozen=True)
class SlotStep:
    """One forward over the packed tokens of every row: pass `input_ids` built by `pack_inputs` and
    these to the model with `cache=`, inside `SlotCache.attending(model)`."""

    n_new: tuple[int, ...]
    """tokens row i feeds (0: none)"""
    position_ids: torch.Tensor
    """[1, total]: each token's position in its own row"""
    rows: torch.Tensor
    """[total] slot of each token"""
    columns: torch.Tensor
    """[total] column its key and value are written to"""
    logits_to_keep: torch.Tensor
    """[feeding rows] the packed index of each feeding row's last token"""
    groups: tuple[_Group, ...]
    attention_mask: torch.Tensor
    """a 4D placeholder: transformers passes a 4D mask through unbuilt, and this cache's attention masks
    each group itself"""

    def last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[feeding rows, vocab], in row order, from the model's logits computed with `logits_to_keep`."""
        return logits[0]

    def offsets(self) -> list[int]:
        """Where each row's tokens start in the packed sequence."""
        out, at = [], 0
        for n in self.n_new:
            out.append(at)
            at += n
        return out


def pack_inputs(chunks: Sequence[Sequence[int]], device: torch.device | str) -> torch.Tensor:
    """[1, total] input ids: every row's tokens for this step, one after the other."""
    return torch.tensor([[t for chunk in chunks for t in chunk]], dtype=torch.long, device=device)


SPLIT_KEYS = 512
"""What a separate attention call costs, in key reads of one query (its fixed overhead on a CPU)."""

C_CHUNK = 8
"""The longest prompt chunk whose queries attend in the C loop, each as a one-token row would (a query at
column c over its row's keys 0 .. c: the causal mask), rather than through torch's attention. On the
project's CPU next to eight decoding rows, a two-token chunk 1,000 keys deep added 0.33x of their step in C
against 0.54-0.78x in torch's, 3,500 deep 0.65x against 1.07-1.14x; at eight tokens the two were even 3,500
deep, and past it torch's, which reads each key once for all the chunk's queries, was ahead."""


def _decode_run(n_new: Sequence[int], lengths: Sequence[int], start: int) -> int:
    """The end of the run of decode rows (n_new 1) from `start` that share one attention call.

    Every row of a call reads as many keys as its longest row holds, so a row far longer than the run so
    far (a prompt fed one token at a time beside short streams, or a long conversation decoding beside
    short ones) starts its own call: merged, eight rows at 50 tokens and one at 3,300 read 9 x 3,300
    keys a layer, 8x what they read in two calls.
    """
    end, width = start + 1, lengths[start] + 1
    while end < len(n_new) and n_new[end] == 1:
        row = lengths[end] + 1
        rows = end - start
        if (rows + 1) * max(width, row) > rows * width + row + SPLIT_KEYS:
            break
        end, width = end + 1, max(width, row)
    return end


_active = threading.local()


def _slot_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
    cache = getattr(_active, "cache", None)
    if cache is None:  # the same model called on another thread while a step runs: plain attention
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return cache.attend(module.layer_idx, query, scaling), None


AttentionInterface.register(ATTENTION, _slot_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)


def _decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, g: _Group,
                      scaling: float | None) -> torch.Tensor:
    """torch's attention of a run of one-token rows, query [rows, heads, head_dim], over their slots (`keys`,
    `values` [max_rows, kv_heads, max_len, head_dim]): [rows, heads, head_dim]."""
    o = F.scaled_dot_product_attention(query[:, :, None], keys[g.rows, :, :g.width], values[g.rows, :, :g.width],
                                       attn_mask=g.mask, scale=scaling, enable_gqa=True)
    return o.view(query.shape)


class _SlotLayer(CacheLayerMixin):
    """One layer's views into the shared storage; writes go through the cache's current step."""

    is_sliding = False

    def __init__(self, cache: SlotCache, index: int) -> None:
        super().__init__()
        self._cache, self._index = cache, index
        self.keys, self.values = cache.storage[index, 0], cache.storage[index, 1]
        self.device = self.keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: the storage must never move

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._cache.write(self._index, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states  # the attention reads the slots, not these

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return self._cache.seq_length

    def get_max_length(self) -> int:
        return self._cache.max_len

    def reset(self) -> None:
        self._cache.clear()


class SlotCache(Cache):
    """Preallocated per-row KV slots for a batch whose rows join and leave between steps.

    Use: `add` rows, then per forward `begin_step` -> model(..., cache=self) inside `attending(model)` ->
    `end_step`; `remove` rows that finished and reorder your own row list with the order it returns. A
    step that fails before `end_step` leaves no trace: its keys lie past every row's length.
    """

    is_compileable = False

    def __init__(self, shape: KVShape, max_rows: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        if max_rows < 1 or max_len < 1:
            raise ValueError("max_rows and max_len must be at least 1")
        self.shape, self.max_rows, self.max_len = shape, max_rows, max_len
        # Zeros, not empty: masked keys still enter q.k before the mask, and garbage could be inf/NaN.
        size = (shape.layers, 2, max_rows, shape.kv_heads, max_len, shape.head_dim)
        if torch.device(device).type == "cpu":  # in 2 MB pages where the system gives them: attention streams it
            self.storage = huge_pages.empty(size, dtype).zero_()
        else:
            self.storage = torch.zeros(size, dtype=dtype, device=device)
        self.planes: tuple[torch.Tensor, ...] = self.storage.unbind(0)
        """each layer's keys and values [2, max_rows, kv_heads, max_len, head_dim], made once"""
        super().__init__(layers=[_SlotLayer(self, i) for i in range(shape.layers)])
        self._lengths: list[int] = []
        self._kept: dict[int, int] = {}
        self.left_in: dict[int, int] = {}
        """where each row the last `remove` freed left its keys: its index then -> the `kept` slot"""
        self._step: SlotStep | None = None

    @classmethod
    def for_model(cls, model: Any, max_rows: int, max_len: int) -> SlotCache:
        """A cache shaped, typed and placed for `model` (a transformers or PEFT model); refuses models it
        cannot serve exactly (see `check_supported`)."""
        config = model.config
        check_supported(config, max_len)
        weight = model.get_input_embeddings().weight
        return cls(KVShape.of(config), max_rows, max_len, dtype=weight.dtype, device=weight.device)

    # ------------------------------------------------------------ rows

    @property
    def rows(self) -> int:
        return len(self._lengths)

    @property
    def lengths(self) -> list[int]:
        """Tokens held by each occupied slot."""
        return list(self._lengths)

    @property
    def seq_length(self) -> int:
        return max(self._lengths, default=0)

    @property
    def kept(self) -> dict[int, int]:
        """Free slots that still hold the tokens of a row that left, and how many, until they are occupied
        again (see `remove`)."""
        return dict(self._kept)

    def add(self, count: int = 1, starts: Sequence[tuple[int, int] | None] | None = None) -> list[int]:
        """Occupy `count` empty slots after the current rows; returns their indices. `starts`, one per new
        row: None (empty), or (a `kept` slot, n): the row starts with that slot's first n tokens, copied unless
        it is the row's own slot. A source must be the row's own slot or lie past the new rows."""
        if self.rows + count > self.max_rows:
            raise SlotsFull(f"the KV cache has {self.max_rows} row slots and {self.rows} are in use; "
                            f"{count} more do not fit")
        first, end = self.rows, self.rows + count
        starts = list(starts or [None] * count)
        if len(starts) != count:
            raise ValueError(f"{len(starts)} starts for {count} new rows")
        for row, (slot, n) in ((first + k, start) for k, start in enumerate(starts) if start is not None):
            if not n <= self._kept.get(slot, 0) or first <= slot < end and slot != row:
                raise ValueError(f"new row {row} cannot start with {n} tokens kept in slot {slot} "
                                 f"(kept: {self._kept})")
        for row, (slot, n) in ((first + k, start) for k, start in enumerate(starts) if start is not None):
            if slot != row:
                self.storage[:, :, row, :, :n] = self.storage[:, :, slot, :, :n]
        lengths = [0 if start is None else start[1] for start in starts]
        for slot in range(first, end):
            self._kept.pop(slot, None)
        self._lengths += lengths
        return list(range(first, end))

    def remove(self, rows: Iterable[int]) -> list[int]:
        """Free slots `rows`; the last rows move into the gaps. Returns `order`: new row i was row order[i]
        (reorder the engine's row list with it). A leaving row's keys stay `kept` (`left_in` says where)
        when it is last, or when it holds no more tokens than the row that moves into its slot: the two
        trade slots, which copies at most twice what the move alone would."""
        order = list(range(self.rows))
        self.left_in = {}
        for gone in sorted(set(rows), reverse=True):  # from the end, so a moved row is never one still to go
            if not 0 <= gone < self.rows:
                raise IndexError(f"row {gone} is not in the cache ({self.rows} rows)")
            last = self.rows - 1
            keep = self._lengths[gone]
            if gone == last:
                self._kept[gone], self.left_in[gone] = keep, gone
            else:
                n = self._lengths[last]
                held = self.storage[:, :, gone, :, :keep].clone() if keep <= n else None
                self.storage[:, :, gone, :, :n] = self.storage[:, :, last, :, :n]
                if held is not None:
                    self.storage[:, :, last, :, :keep] = held
                    self._kept[last], self.left_in[gone] = keep, last
                self._lengths[gone], order[gone] = n, order[last]
            self._lengths.pop()
            order.pop()
        return order

    def swap(self, i: int, j: int) -> None:
        """Exchange the contents of slots i and j (each copied up to the longer of the two lengths)."""
        if not (0 <= i < self.rows and 0 <= j < self.rows):
            raise IndexError(f"rows {i} and {j}: the cache holds {self.rows} rows")
        if i == j:
            return
        n = max(self._lengths[i], self._lengths[j])
        held = self.storage[:, :, i, :, :n].clone()
        self.storage[:, :, i, :, :n] = self.storage[:, :, j, :, :n]
        self.storage[:, :, j, :, :n] = held
        self._lengths[i], self._lengths[j] = self._lengths[j], self._lengths[i]

    def copy_prefix(self, source: int, target: int, n: int) -> None:
        """Give row `target` the first `n` tokens of row `source` (copying those past what it holds): for a
        row whose prompt starts as `source`'s, under the same adapter and steering, their keys and values are
        the same."""
        if not (0 <= source < self.rows and 0 <= target < self.rows) or source == target:
            raise IndexError(f"rows {source} and {target}: two different rows of the {self.rows} in the cache")
        have = self._lengths[target]
        if not have <= n <= self._lengths[source]:
            raise ValueError(f"row {target} holds {have} tokens and row {source} {self._lengths[source]}: "
                             f"cannot copy the first {n}")
        self.storage[:, :, target, :, have:n] = self.storage[:, :, source, :, have:n]
        self._lengths[target] = n

    def clear(self) -> None:
        """Drop every row and every kept one (the storage stays allocated)."""
        self._lengths, self._kept = [], {}
        self._step = None

    # ------------------------------------------------------------ steps

    @property
    def step(self) -> SlotStep:
        if self._step is None:
            raise RuntimeError("SlotCache used outside a step: call begin_step before the forward")
        return self._step

    def begin_step(self, n_new: Sequence[int]) -> SlotStep:
        """Prepare a forward in which row i feeds n_new[i] tokens (0: none), one entry per row.

        Raises ContextFull, before writing anything, if a row would outgrow its slot.
        """
        if len(n_new) != self.rows:
            raise IndexError(f"a step over {len(n_new)} rows but the cache holds {self.rows} rows")
        if min(n_new, default=0) < 0 or max(n_new, default=0) < 1:
            raise ValueError("every row feeds 0 or more tokens and at least one row feeds some")
        for i, (have, new) in enumerate(zip(self._lengths, n_new, strict=True)):
            if have + new > self.max_len:
                raise ContextFull(f"row {i} would hold {have + new} tokens; the KV cache holds {self.max_len} per row")
        device = self.storage.device
        rows, columns, last, groups = [], [], [], []
        i, at = 0, 0
        while i < len(n_new):
            n, have = n_new[i], self._lengths[i]
            if n == 0:
                i += 1
                continue
            if n == 1:  # a run of decode rows: one query each, one call
                j = _decode_run(n_new, self._lengths, i)
                held = self._lengths[i:j]
                width = max(held) + 1
                mask = None
                if min(held) != max(held):
                    after = torch.tensor(held, device=device)[:, None] + 1
                    mask = (torch.arange(width, device=device)[None, :] < after)[:, None, None]
                groups.append(_Group(slice(at, at + j - i), slice(i, j), width, mask, True))
                rows += range(i, j)
                columns += [self._lengths[r] for r in range(i, j)]
                last += range(at, at + j - i)
                at += j - i
                i = j
                continue
            width = have + n
            limit = have + torch.arange(n, device=device)[:, None]
            mask = torch.arange(width, device=device)[None, :] <= limit
            groups.append(_Group(slice(at, at + n), slice(i, i + 1), width, mask[None, None], False))
            rows += [i] * n
            columns += range(have, have + n)
            at += n
            last.append(at - 1)
            i += 1
        cols = torch.tensor(columns, device=device)
        self._step = SlotStep(tuple(n_new), cols[None], torch.tensor(rows, device=device), cols,
                              torch.tensor(last, device=device), tuple(groups),
                              torch.ones((1, 1, 1, 1), dtype=torch.bool, device=device))
        return self._step

    def end_step(self) -> None:
        """Count the step's tokens into each row's length (after a successful forward)."""
        step = self.step
        for i, new in enumerate(step.n_new):
            self._lengths[i] += new
        self._step = None

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store layer `layer`'s keys and values of the step, [total, kv_heads, head_dim], each token in its
        row's slot."""
        step = self.step
        # One indexed write for both (a third cheaper than two): the advanced indices on dims 1 and 3 put
        # the indexed dims first, [total, 2, kv_heads, head_dim].
        self.storage[layer][:, step.rows, :, step.columns] = torch.stack((keys, values), 1)

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None) -> torch.Tensor:
        """Attention of the step's packed queries [1, heads, total, head_dim] over their rows' slots, as
        transformers' attention functions return it: [1, total, heads, head_dim]."""
        return self.attend_packed(layer, query[0].transpose(0, 1), scaling)[None]

    def attend_packed(self, layer: int, query: torch.Tensor, scaling: float | None,
                      kernel: ForwardKernel | None = None) -> torch.Tensor:
        """Attention of the step's queries [total, heads, head_dim] (one per packed token) over their rows'
        slots: [total, heads, head_dim]. With `kernel` (float32 on CPU) one-token rows and prompt chunks of at
        most `C_CHUNK` tokens attend in its C loop, longer chunks through torch's."""
        slot = self.layers[layer]
        keys, values = slot.keys, slot.values
        assert keys is not None and values is not None
        step = self.step
        groups = step.groups
        if kernel is None and len(groups) == 1 and groups[0].decode:  # decoding rows only: no copy out
            return _decode_attention(query, keys, values, groups[0], scaling)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        for g in groups:
            if kernel is not None and (g.decode or g.tokens.stop - g.tokens.start <= C_CHUNK):
                scale = scaling if scaling is not None else query.shape[-1] ** -0.5
                kernel.attend_rows(query, g.tokens, step.rows, step.columns, self.planes[layer], scale, out)
                continue
            q = query[g.tokens]  # [queries, heads, head_dim]
            if g.decode:
                out[g.tokens] = _decode_attention(q, keys, values, g, scaling)
                continue
            # A prompt chunk's query heads that share a key head stacked as one head of group x queries, so
            # the attention reads each key head as it lies: with enable_gqa torch copied the keys and values
            # out to every query head first (four queries at 3,500 keys: 1.08 ms a layer, 0.73 ms so).
            n, heads, head_dim = q.shape
            kv_heads = keys.shape[1]
            group = heads // kv_heads
            q = q.transpose(0, 1).reshape(1, kv_heads, group * n, head_dim)
            mask = g.mask.repeat(1, 1, group, 1) if g.mask is not None and group > 1 else g.mask
            o = F.scaled_dot_product_attention(q, keys[g.rows, :, :g.width], values[g.rows, :, :g.width],
                                               attn_mask=mask, scale=scaling)
            out[g.tokens] = o.view(heads, n, head_dim).transpose(0, 1)
        return out

    @contextmanager
    def attending(self, model: Any) -> Iterator[None]:
        """Within: `model` (and only on this thread) attends through this cache's slots."""
        config = model.config
        before = config._attn_implementation
        _active.cache = self
        config._attn_implementation = ATTENTION
        try:
            yield
        finally:
            config._attn_implementation = before
            _active.cache = None

    # ------------------------------------------------------------ Cache interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def reset(self) -> None:
        self.clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlotCache rows are trimmed by the engine, not by generate()")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SlotCache does not support beam search")
