"""The C kernel for one-token LoRA rows on CPU (csrc/lora_rows.c), built on first use with the system's compiler.

On a CPU decode step each row's LoRA is two small matrix-vector products; torch's batched matmul spends
more on each of them than reading its factors takes, so eight rows on eight different adapters cost a
SmolLM2-135M step about 19% against a 5% floor of reading the bytes. The kernel does a module's rows in
one call, each row one pass over its factors where they lie, rows on the same slot in one pass together
(benchmarks/lora_layout_bench.py and site_kernel_bench.py compare).

It is a Python extension module built on first use (`c_extension`); the structs it reads are ctypes
Structures the slots own. Where it cannot be built, or `RAHF_LORA_KERNEL=0`, `row_kernel()` says why once
in the log and the slots keep torch's products, which give the same results up to float rounding.

Where torch's threads are GNU OpenMP's (its Linux wheels), the kernel is built with -fopenmp, binds to that
same runtime, and shares a site's rows between torch's threads; elsewhere, or if that build fails, a site
runs on the calling thread alone.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from . import c_extension
from .c_extension import BuiltOnce

log = logging.getLogger(__name__)

SOURCE = c_extension.CSRC / "lora_rows.c"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


class Rows(ctypes.Structure):
    """A step's one-token rows (C `struct rahf_rows`): count, positions (NULL: 0 .. n-1), slots, rank."""

    _fields_ = [("n", _I64), ("tokens", _PTR), ("slots", _PTR), ("r", _I64)]


class Factors(ctypes.Structure):
    """A module's slot tensors (C `struct rahf_factors`): A [slots, rank, in], B transposed [slots, rank, out],
    and their element type (a `FACTOR_DTYPES` index), or `BF16_DOTS`."""

    _fields_ = [("in_features", _I64), ("out_features", _I64), ("A", _PTR), ("a_stride", _I64), ("B", _PTR),
                ("b_stride", _I64), ("dtype", _I64)]


FACTOR_DTYPES = (torch.float32, torch.bfloat16)
"""The factor types the kernel reads (C `RAHF_F32`, `RAHF_BF16`), multiplied in float32; its inputs and
outputs are float32."""

BF16_DOTS = 2
"""`Factors.dtype` for bfloat16 factors multiplied in bfloat16 dot products (C `RAHF_BF16_DOTS`): each row's
input and rank sums rounded to bfloat16, as `--matmul-dtype bfloat16` rounds the forward's products' inputs;
where `RowKernel.bf16_dots`."""


class Plan(ctypes.Structure):
    """A module group's plan for the step as the site call reads it (C `struct rahf_plan`): `state` NONE (no row
    uses its modules' slots), ROWS (every LoRA row is one token, at `rows`) or OTHER (more than the kernel
    does), the step's token count, and how many threads a site may share its rows between (torch's count)."""

    NONE, ROWS, OTHER = 0, 1, 2
    _fields_ = [("state", _I64), ("total", _I64), ("rows", _PTR), ("threads", _I64)]


class SiteModule(ctypes.Structure):
    """One module of a site (C `struct rahf_site_module`): the address of the cell holding its group's `Plan`'s
    address, of its `Factors`, and the column its output starts at."""

    _fields_ = [("plan", _PTR), ("factors", _PTR), ("column", _I64)]


class Site(ctypes.Structure):
    """Modules reading one input [total, ldx] and adding into one output [total, ldy] (C `struct rahf_site`):
    their count and the address of their `SiteModule` array."""

    _fields_ = [("n", _I64), ("ldx", _I64), ("ldy", _I64), ("modules", _PTR)]


def rows_for(tokens: torch.Tensor | None, slots: torch.Tensor, rank: int) -> Rows:
    """The struct for int64 `slots` (and positions `tokens`); the tensors must outlive its use."""
    return Rows(slots.numel(), None if tokens is None else tokens.data_ptr(), slots.data_ptr(), rank)


def factors_for(slot_a: torch.Tensor, slot_b: torch.Tensor, bf16_dots: bool = False) -> Factors:
    """The struct for slot tensors [slots, rank, in] and [slots, rank, out], contiguous, of one of
    `FACTOR_DTYPES`; bfloat16 ones multiplied in bfloat16 dot products where `bf16_dots`."""
    if not (slot_a.is_contiguous() and slot_b.is_contiguous()):
        raise ValueError("the row kernel reads contiguous slot tensors")
    if slot_a.dtype != slot_b.dtype or slot_a.dtype not in FACTOR_DTYPES:
        raise ValueError(f"the row kernel reads float32 or bfloat16 factors, not {slot_a.dtype} and {slot_b.dtype}")
    if bf16_dots and slot_a.dtype != torch.bfloat16:
        raise ValueError(f"bfloat16 dot products multiply bfloat16 factors, not {slot_a.dtype}")
    return Factors(slot_a.shape[2], slot_b.shape[2], slot_a.data_ptr(), slot_a.stride(0), slot_b.data_ptr(),
                   slot_b.stride(0), BF16_DOTS if bf16_dots else FACTOR_DTYPES.index(slot_a.dtype))


class RowKernel:
    """The kernel's functions (see csrc/lora_rows.c), taking addresses and sizes as ints and adding each row's
    LoRA to y in place: `rows(&Rows, &Factors, x, ldx, y, ldy)` for one module, `site(&Site, total, x, y)`
    for modules sharing x and y (True when done, False when it did nothing). Nothing is checked below these
    calls: `SlotLinear` and `SlotSite` own the shapes."""

    def __init__(self, path: Path, module: ModuleType) -> None:
        self.path = path
        self.rows: Callable[[int, int, int, int, int, int], None] = module.rows
        self.site: Callable[[int, int, int, int], bool] = module.site
        self.site_function = int(getattr(module, "site_function", 0))
        """the address of `site` as a C function (`rahf_site_fn` in csrc/extension.h), which the forward
        kernel's products call after their own work; 0 where the module has none"""
        self.openmp = bool(getattr(module, "openmp", False))
        """whether a site's rows are shared between torch's OpenMP threads (built with -fopenmp)"""
        self.bf16_dots = bool(module.bf16_dots()) if hasattr(module, "bf16_dots") else False
        """whether rows multiply bfloat16 factors in bfloat16 dot products here (`BF16_DOTS`: an AVX-512
        build on a CPU with AVX512_BF16)"""


def build_row_kernel(cache: Path | None = None, compiler: str | None = None, source: Path = SOURCE) -> RowKernel:
    """Compile (unless cached) and load the kernel; KernelUnavailable if not. `source`: another C file defining
    the module `lora_rows` (benchmarks put a no-op in the kernel's place)."""
    return RowKernel(*c_extension.build_for_torch_threads(source, "lora_rows", cache, compiler))


_kernel = BuiltOnce("LoRA row kernel", "RAHF_LORA_KERNEL", "one-token rows use torch's batched matmul",
                    build_row_kernel, log)


def row_kernel() -> RowKernel | None:
    """The kernel, built at most once per process; None (with the reason logged once) where it cannot be."""
    return _kernel.get()
