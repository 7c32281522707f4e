"""Large CPU tensors in memory backed by 2 MB pages where Linux gives them (transparent huge pages).

A decode step streams the forward's weight panels and its rows' keys and values from memory. In 4 KB
pages that stream needs a new address translation every 4 KB, and how fast it runs varied with where the
allocator put a copy (in one process, at one row, the forward built first took 1.2x as long as one built
second). In 2 MB pages, on the project's CPU, a one-row SmolLM2-135M step took 0.91-0.92x as long and an
eight-row one 0.96x (the panels; `benchmarks/forward_ops_bench.py --small-pages-too`), and with the KV
cache too eight rows at 2,000 tokens of context 0.96x again; the build-order difference went away.
Linux backs an anonymous private mapping with huge pages when asked (`madvise`, the usual
`transparent_hugepage` setting) or always; where it will not, or elsewhere, or with `RAHF_HUGE_PAGES=0`,
these are ordinary tensors.
"""

from __future__ import annotations

import math
import mmap
import os
import sys

import torch

HUGE_PAGE = 2 << 20


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, in 2 MB pages where this system gives them (at least one page's
    worth); otherwise `torch.empty`. Its memory is returned to the system when the last view of it goes."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    wanted = os.environ.get("RAHF_HUGE_PAGES") != "0"
    if not wanted or nbytes < HUGE_PAGE or advice is None or not sys.platform.startswith("linux"):
        return torch.empty(shape, dtype=dtype)
    # Private and anonymous: a shared mapping is shmem, which transparent huge pages leave alone by default.
    # One page more than needed, so the tensor can start on a 2 MB boundary (only whole aligned pages are huge).
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(advice)  # before any page is touched: the first touch then faults a whole huge page
    except OSError:  # a kernel without transparent huge pages: ordinary pages, still correct
        pass
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds `region`: unmapped with the last view
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape)
