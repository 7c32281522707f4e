"""The engine's former running-batch KV cache (left-padded DynamicCache), the baseline of kvcache_bench.py.

The engine now uses `kvcache.SlotCache`. This one holds rows left-padded to a common length with their
attention mask: every decode step concatenates a column, a joining row's prefilled cache is padded in
on the left, and a leaving row copies the whole cache. It lives here, not in the package: nothing
serves with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DynamicCache


class KVBatch:
    """A DynamicCache of shape [rows, heads, columns, head_dim] per layer plus its [rows, columns] mask."""

    def __init__(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        self.cache = cache
        self.mask = mask

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def grow(self) -> torch.Tensor:
        """Append a column for the token every row is about to decode; returns the new mask."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.rows, 1))], dim=1)
        return self.mask

    def extend(self, other: KVBatch) -> None:
        """Append `other`'s rows below ours, padding the shorter side on the left."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_cols(mine.keys, width), _pad_cols(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_pad_cols(mine.values, width), _pad_cols(theirs.values, width)], dim=0)
        self.mask = torch.cat([_pad_mask(self.mask, width), _pad_mask(other.mask, width)], dim=0)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order), then drop leading columns that are padding for all of them."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0]) if len(rows) else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, width - t.shape[2], 0)) if t.shape[2] < width else t


def _pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(mask, (width - mask.shape[1], 0)) if mask.shape[1] < width else mask
