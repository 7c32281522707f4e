"""Large CPU tensors in memory backed by 2 MB pages where Linux gives them (transparent huge pages).

A decode step streams the forward's weight panels and its rows' keys and values from memory. In 4 KB
pages how fast that stream ran depended on where the allocator put a copy: on the project's CPU the same
one-row SmolLM2-135M step took 1.0x to 1.2x as long from one copy of the panels to the next (in one
process, the forward built first 1.2x as long as one built second, three times over). In 2 MB pages it ran
at the fast end every time: 0.88-1.0x the 4 KB step at one row and 0.96-1.0x at eight over three runs of
`benchmarks/forward_ops_bench.py --small-pages-too`, 0.86-0.90x at one row with torch's own allocations in
them too (`THP_MEM_ALLOC_ENABLE=1`), and the build-order difference gone.
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
