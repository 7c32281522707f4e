"""The packed llama forward's operators in C (csrc/forward_ops.c), for float32 on CPU: its matrix products over
weights stored in panels (in float32, or in bfloat16: AVX2 or AVX512_BF16), RMSNorm, the rotary
embedding with the KV cache write, and the attention of one-token rows over their cache slots.

On a one-row decode step of a small model torch spends longer dispatching these than computing them (about
7 ms of a 45 ms SmolLM2-135M step outside the products); here each is one call. Built on first use
(`c_extension`); where it cannot be, or `RAHF_FORWARD_KERNEL=0`, `forward_kernel()` says why once in the log
and the packed forward keeps torch's operators, which give the same results up to float rounding.

The products need the weights in their own layout (`panels`): a second copy of every matrix the forward
multiplies by, made once when the forward is built, which is what makes them 1.3-3.6x faster than torch's
on one thread at the row counts a server steps with (benchmarks/panel_product_bench.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from . import c_extension, huge_pages
from .c_extension import BuiltOnce

log = logging.getLogger(__name__)

SOURCE = c_extension.CSRC / "forward_ops.c"


NO_SITE = (0, 0)
"""`ForwardKernel.product_then`'s site for none"""


class ForwardKernel:
    """Typed calls into the extension. Nothing is checked below them: `PackedLlama` and `SlotCache` own the
    layouts (activations row-major float32, q/k/v side by side in one row, the cache's contiguous slots)."""

    def __init__(self, path: Path, module: ModuleType) -> None:
        self.path = path
        self._rms_norm = module.rms_norm
        self._rotate_and_store = module.rotate_and_store
        self._attend_rows = module.attend_rows
        self._product = module.product
        self.panel = int(module.panel)
        """output columns per panel of a weight in the products' layout"""
        self.openmp = bool(module.openmp)
        """whether long attention calls are shared between torch's OpenMP threads (built with -fopenmp)"""
        self.bf16 = bool(module.bf16_products())
        """whether products over bfloat16 panels run here (the AVX2 build; the AVX-512 build on a CPU with
        AVX512_BF16)"""

    def panels(self, weight: torch.Tensor, into: torch.Tensor | None = None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`weight` [out, in] (on CPU) in the products' layout: float32 [ceil(out / panel), in, panel], each
        panel a contiguous run of `panel` output columns, those past `out` zero; bfloat16 (where `bf16`)
        [ceil(out / panel), ceil(in / 2), panel, 2], each column's inputs in consecutive pairs, an odd last
        one paired with zero. Written `into` (that shape, contiguous) when given."""
        out, inp = weight.shape
        full, rest = divmod(out, self.panel)
        # In 2 MB pages where the system gives them: a step streams every panel (see huge_pages).
        panels = huge_pages.empty(self._shape(weight, dtype), dtype) if into is None else into
        if dtype == torch.bfloat16:
            # One panel at a time: the columns' pairs, padded, are a transient copy of one panel only.
            for p in range(full + bool(rest)):
                block = torch.zeros(self.panel, 2 * panels.shape[1], dtype=dtype)
                rows = weight[p * self.panel:(p + 1) * self.panel]
                block[:rows.shape[0], :inp] = rows
                panels[p] = block.view(self.panel, -1, 2).transpose(0, 1)
            return panels
        # Copied straight into place: a padded copy first would hold a second transient copy of a large
        # matrix (the LM head's is 113 MB on the default model) at start-up.
        panels[:full] = weight[:full * self.panel].view(full, self.panel, inp).transpose(1, 2)
        if rest:
            panels[full, :, :rest] = weight[full * self.panel:].t()
            panels[full, :, rest:] = 0
        return panels

    def panels_of(self, weights: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Each weight's `panels` in `dtype`, all in one allocation, each starting on a 64-byte line: in 2 MB
        pages, a matrix of its own would pay for its last page whole (about 100 MB over the default model's
        121)."""
        if dtype == torch.bfloat16 and not self.bf16:
            raise ValueError("bfloat16 products need the kernel's AVX2 build, or its AVX-512 build on a CPU with "
                             f"AVX512_BF16; this one is {torch.backends.cpu.get_cpu_capability()} without them")
        shapes = [self._shape(w, dtype) for w in weights]
        line = 64 // dtype.itemsize
        sizes = [-(-math.prod(shape) // line) * line for shape in shapes]
        arena = huge_pages.empty((sum(sizes),), dtype)
        out, at = [], 0
        for w, shape, size in zip(weights, shapes, sizes, strict=True):
            out.append(self.panels(w, arena[at:at + math.prod(shape)].view(shape), dtype))
            at += size
        return out

    def _shape(self, weight: torch.Tensor, dtype: torch.dtype) -> tuple[int, ...]:
        out, inp = weight.shape
        if dtype == torch.bfloat16:
            return -(-out // self.panel), -(-inp // 2), self.panel, 2
        if dtype != torch.float32:
            raise ValueError(f"products in float32 or bfloat16, not {dtype}")
        return -(-out // self.panel), inp, self.panel

    def product(self, x: torch.Tensor, panels: torch.Tensor, out_features: int,
                into: torch.Tensor | None = None) -> torch.Tensor:
        """x [tokens, in] (rows contiguous) times the weight `panels` holds, [tokens, out_features]; with
        `into` (contiguous, that shape), added to it in place and returned."""
        return self.product_then(x, panels, out_features, into, NO_SITE)[0]

    def product_then(self, x: torch.Tensor, panels: torch.Tensor, out_features: int, into: torch.Tensor | None,
                     site: tuple[int, int]) -> tuple[torch.Tensor, bool]:
        """`product`, then in the same C call the LoRA rows of `site` (a `rahf_site_fn`'s address and its
        site's: `SlotSite.call`) added to the output; and whether they were (False: the site did nothing,
        its rows are the caller's to add)."""
        tokens, inp = x.shape
        y = torch.empty(tokens, out_features, dtype=x.dtype) if into is None else into
        done = self._product(x.data_ptr(), x.stride(0), tokens, panels.data_ptr(), inp, out_features, y.data_ptr(),
                             out_features, int(into is not None), int(panels.dtype == torch.bfloat16),
                             torch.get_num_threads(), *site)
        return y, done

    def rms_norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """LlamaRMSNorm of each row of h [tokens, hidden] (contiguous)."""
        out = torch.empty_like(h)
        self._rms_norm(h.data_ptr(), weight.data_ptr(), out.data_ptr(), h.shape[0], h.shape[1], eps)
        return out

    def rotate_and_store(self, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin_signed: torch.Tensor,
                         rows: torch.Tensor, columns: torch.Tensor, layer: torch.Tensor) -> None:
        """For each token (row of qkv [tokens, (heads + 2 kv_heads) * head_dim], contiguous): rotate its query
        heads in place, and write its key heads rotated and its value heads to `layer` [2, max_rows, kv_heads,
        max_len, head_dim] at (rows[t], columns[t]); its position is its column. `cos`, `sin_signed`: the
        rotary tables [positions, head_dim], sin's first half negated."""
        _, max_rows, kv_heads, max_len, head_dim = layer.shape
        self._rotate_and_store(qkv.data_ptr(), qkv.shape[1], qkv.shape[0], heads, kv_heads, head_dim, max_rows,
                               max_len, cos.data_ptr(), sin_signed.data_ptr(), rows.data_ptr(), columns.data_ptr(),
                               layer.data_ptr())

    def attend_rows(self, query: torch.Tensor, tokens: slice, rows: torch.Tensor, columns: torch.Tensor,
                    layer: torch.Tensor, scale: float, out: torch.Tensor) -> None:
        """Attention of the one-token rows at `tokens` of the step, query [total, heads, head_dim] (each
        token's heads contiguous, tokens any stride), over their row's keys 0 .. columns[t] in `layer`, into
        out [total, heads, head_dim] (contiguous); shared between torch's threads when long enough."""
        _, max_rows, kv_heads, max_len, head_dim = layer.shape
        self._attend_rows(query.data_ptr(), query.stride(0), tokens.start, tokens.stop, query.shape[1], kv_heads,
                          head_dim, max_rows, max_len, rows.data_ptr(), columns.data_ptr(), layer.data_ptr(),
                          out.data_ptr(), torch.get_num_threads(), scale)


def build_forward_kernel(cache: Path | None = None, compiler: str | None = None, source: Path = SOURCE) -> ForwardKernel:
    """Compile (unless cached) and load the extension; KernelUnavailable if not. `source`: another C file
    defining the module `forward_ops` (benchmarks time another commit's beside this one)."""
    return ForwardKernel(*c_extension.build_for_torch_threads(source, "forward_ops", cache, compiler))


_kernel = BuiltOnce("forward kernel", "RAHF_FORWARD_KERNEL", "the packed forward keeps torch's operators",
                    build_forward_kernel, log)


def forward_kernel() -> ForwardKernel | None:
    """The extension, built at most once per process; None (with the reason logged once) where it cannot be."""
    return _kernel.get()
