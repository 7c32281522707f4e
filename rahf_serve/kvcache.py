"""A preallocated KV cache for the running batch: one slot per row, written in place.

Every layer's keys and values live in one tensor allocated once, [layers, 2, max_rows, kv_heads,
max_len + 1, head_dim]. The running batch occupies slots 0..rows-1, so what attention reads in a step,
`keys[start:start + m, :, :width]`, is a view: nothing is concatenated per step and nothing is copied
when a row joins. When a row leaves, the last row moves into its slot (one row copied, up to its own
length), so the occupied slots stay contiguous.

A step may feed each row a different number of tokens (decode 1, prefill or a prefill chunk T): inputs
are right-padded to the step's longest row. Padding queries write their keys to the scratch column
`max_len`, which no view ever includes, and attend to key 0 only, so they stay finite and touch no real
row. A row's attention mask is built from its length alone: no mask columns are stored.

Only plain full attention is supported (the llama family); `check_supported` refuses other models
rather than let them answer wrongly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

from .errors import BaseModelError, QueueFull, RequestTooLarge

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose attention reads the cache only through `Cache.update` and the 4D mask (each is
checked against transformers' own DynamicCache by the tests)."""
SUPPORTED_ATTENTION = ("sdpa", "eager")
"""Attention kernels that take a 4D mask as given (flash-attention kernels ignore it)."""


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
        """Memory for keys and values of `max_rows` slots of `max_len` tokens (plus the scratch column)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.layers * max_rows * self.kv_heads * (max_len + 1) * self.head_dim * itemsize


def kv_cache_bytes(config: Any, max_rows: int, max_len: int, dtype: torch.dtype) -> int:
    """Bytes a SlotCache of this size takes for a model with this config (for sizing from a memory budget)."""
    return KVShape.of(config).bytes(max_rows, max_len, dtype)


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
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    if attention not in SUPPORTED_ATTENTION:
        raise refuse(f"attention implementation {attention!r} ignores a 4D mask; load it with sdpa or eager")


@dataclass(frozen=True)
class SlotStep:
    """What one forward over slots start..start+m-1 needs: pass these to the model with `cache=`."""

    start: int
    n_new: tuple[int, ...]
    width: int
    """keys each row's attention reads this step (the longest row's length after it)"""
    attention_mask: torch.Tensor
    """[m, 1, T, width]: bool for sdpa, additive float for eager"""
    position_ids: torch.Tensor
    """[m, T]: a row's length + t; padding queries repeat the row's last position"""
    logits_to_keep: torch.Tensor
    """[m, 1]: each row's last real query, so the model computes logits only there"""
    rows: torch.Tensor
    """[m, T] slot written by each query"""
    columns: torch.Tensor
    """[m, T] column written by each query (the scratch column for padding)"""

    def last_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[m, vocab] from the model's logits computed with `logits_to_keep` (or all T positions)."""
        if logits.shape[1] == 1:
            return logits[:, 0]
        return logits[torch.arange(len(self.n_new), device=logits.device), self.logits_to_keep[:, 0]]


def pack_inputs(chunks: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> torch.Tensor:
    """[m, T] input ids: each row's tokens for this step, right-padded to the longest with `pad_id`."""
    width = max(len(c) for c in chunks)
    ids = torch.full((len(chunks), width), pad_id, dtype=torch.long)
    for i, chunk in enumerate(chunks):
        ids[i, :len(chunk)] = torch.tensor(list(chunk), dtype=torch.long)
    return ids.to(device)


class _SlotLayer(CacheLayerMixin):
    """One layer's views into the shared storage; writes go through the cache's current step."""

    is_sliding = False

    def __init__(self, cache: SlotCache, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self._cache = cache
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated up front: the storage must never move

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        step = self._cache.step
        assert self.keys is not None and self.values is not None
        # Advanced indices on dims 0 and 2 put the indexed dims first: [m, T, heads, head_dim].
        self.keys[step.rows, :, step.columns] = key_states.transpose(1, 2)
        self.values[step.rows, :, step.columns] = value_states.transpose(1, 2)
        rows = slice(step.start, step.start + len(step.n_new))
        return self.keys[rows, :, :step.width], self.values[rows, :, :step.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._cache.step.width, 0

    def get_seq_length(self) -> int:
        return self._cache.seq_length

    def get_max_length(self) -> int:
        return self._cache.max_len

    def reset(self) -> None:
        self._cache.clear()


class SlotCache(Cache):
    """Preallocated per-row KV slots for a batch whose rows join and leave between steps.

    Use: `add` rows, then per forward `begin_step` -> model(..., cache=self) -> `end_step`; `remove`
    rows that finished and reorder your own row list with the order it returns. A step that fails
    before `end_step` leaves no trace: its keys lie past every row's length.
    """

    is_compileable = False

    def __init__(self, shape: KVShape, max_rows: int, max_len: int, *, dtype: torch.dtype,
                 device: torch.device | str, attention: str = "sdpa") -> None:
        if max_rows < 1 or max_len < 1:
            raise ValueError("max_rows and max_len must be at least 1")
        self.shape, self.max_rows, self.max_len, self.attention = shape, max_rows, max_len, attention
        # Zeros, not empty: masked keys still enter q.k before the mask, and garbage could be inf/NaN.
        self.storage = torch.zeros((shape.layers, 2, max_rows, shape.kv_heads, max_len + 1, shape.head_dim),
                                   dtype=dtype, device=device)
        super().__init__(layers=[_SlotLayer(self, self.storage[i, 0], self.storage[i, 1])
                                 for i in range(shape.layers)])
        self._lengths: list[int] = []
        self._step: SlotStep | None = None

    @classmethod
    def for_model(cls, model: Any, max_rows: int, max_len: int) -> SlotCache:
        """A cache shaped, typed and placed for `model` (a transformers or PEFT model); refuses models it
        cannot serve exactly (see `check_supported`)."""
        config = model.config
        check_supported(config, max_len)
        weight = model.get_input_embeddings().weight
        return cls(KVShape.of(config), max_rows, max_len, dtype=weight.dtype, device=weight.device,
                   attention=getattr(config, "_attn_implementation", None) or "sdpa")

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

    def add(self, count: int = 1) -> list[int]:
        """Occupy `count` empty slots after the current rows; returns their indices. Nothing is copied."""
        if self.rows + count > self.max_rows:
            raise SlotsFull(f"the KV cache has {self.max_rows} row slots and {self.rows} are in use; "
                            f"{count} more do not fit")
        first = self.rows
        self._lengths += [0] * count
        return list(range(first, first + count))

    def remove(self, rows: Iterable[int]) -> list[int]:
        """Free slots `rows`; the last rows move into the gaps. Returns `order`: new row i was row order[i]
        (reorder the engine's row list with it)."""
        order = list(range(self.rows))
        for gone in sorted(set(rows), reverse=True):  # from the end, so a moved row is never one still to go
            if not 0 <= gone < self.rows:
                raise IndexError(f"row {gone} is not in the cache ({self.rows} rows)")
            last = self.rows - 1
            if gone != last:
                n = self._lengths[last]
                self.storage[:, :, gone, :, :n] = self.storage[:, :, last, :, :n]
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

    def clear(self) -> None:
        """Drop every row (the storage stays allocated)."""
        self._lengths = []
        self._step = None

    # ------------------------------------------------------------ steps

    @property
    def step(self) -> SlotStep:
        if self._step is None:
            raise RuntimeError("SlotCache used outside a step: call begin_step before the forward")
        return self._step

    def begin_step(self, n_new: Sequence[int], start: int = 0) -> SlotStep:
        """Prepare a forward over slots start..start+len(n_new)-1, row i feeding n_new[i] tokens (0: none).

        Raises ContextFull, before writing anything, if a row would outgrow its slot.
        """
        m = len(n_new)
        if m == 0 or start < 0 or start + m > self.rows:
            raise IndexError(f"a step over rows {start}..{start + m - 1} but the cache holds {self.rows} rows")
        if min(n_new) < 0 or max(n_new) < 1:
            raise ValueError("every row feeds 0 or more tokens and at least one row feeds some")
        lengths = self._lengths[start:start + m]
        for i, (have, new) in enumerate(zip(lengths, n_new, strict=True)):
            if have + new > self.max_len:
                raise ContextFull(f"row {start + i} would hold {have + new} tokens; "
                                  f"the KV cache holds {self.max_len} per row")
        device = self.storage.device
        t_len, width = max(n_new), max(h + n for h, n in zip(lengths, n_new, strict=True))
        have_t = torch.tensor(lengths, device=device)[:, None]
        new_t = torch.tensor(list(n_new), device=device)[:, None]
        t = torch.arange(t_len, device=device)[None, :]
        real = t < new_t
        columns = torch.where(real, have_t + t, self.max_len)
        rows = torch.arange(start, start + m, device=device)[:, None].expand(m, t_len)
        # A padding query sees key 0 only: a softmax over nothing would be NaN.
        limit = torch.where(real, have_t + t, 0)
        mask = torch.arange(width, device=device)[None, None, :] <= limit[:, :, None]
        last = (new_t - 1).clamp(min=0)
        positions = have_t + torch.minimum(t, last)
        self._step = SlotStep(start, tuple(n_new), width, self._as_attention_mask(mask[:, None]), positions,
                              last, rows, columns)
        return self._step

    def end_step(self) -> None:
        """Count the step's tokens into each row's length (after a successful forward)."""
        step = self.step
        for i, new in enumerate(step.n_new):
            self._lengths[step.start + i] += new
        self._step = None

    def _as_attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        if self.attention != "eager":
            return allowed
        # eager attention adds the mask to the scores, so it needs 0 / -inf-like values, not booleans.
        dtype = self.storage.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------ Cache interface

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.step.width, 0

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_len

    def reset(self) -> None:
        self.clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("SlotCache rows are trimmed by the engine, not by generate()")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("SlotCache does not support beam search")
