"""The row kernel's site calls alone, without the forward around them: one thread against torch's threads,
float32 factors against bfloat16, multiplied in float32 or (where the CPU has AVX512_BF16, "bf16 dots") in
bfloat16 dot products.

    python benchmarks/site_kernel_bench.py                   # 8 rows on 8 slots, SmolLM2-135M's sites
    python benchmarks/site_kernel_bench.py --adapters 1      # every row on one slot: its factors in cache
    python benchmarks/site_kernel_bench.py --rows 1 8 16 --threads 1 2
    git show HEAD~1:rahf_serve/csrc/lora_rows.c > /tmp/old.c
    python benchmarks/site_kernel_bench.py --against /tmp/old.c     # this kernel against another source

SmolLM2-135M's 120 sites (per layer q/k/v, o, gate/up, down), every module with r16 factors on 8 slots
(156 MB in float32 for eight rows: more than the last-level cache, so each pass reads them from memory, as a
decode step does), rows on slots 0..7 in turn (`--adapters N`: on slots 0..N-1, so with 1 every row after
the first reads its factors from cache: the kernel's arithmetic rather than its reads). One time is one pass
over all sites; every combination of thread count and factor type is timed in every round, in turn, and a
figure is the median over rounds. `--against FILE`: the
kernel built from another source is timed in the same rounds, over the same factors, inputs and outputs
(where the allocator put a copy of the factors moved a pass by up to ~20%, more than most kernel changes), and
each ratio (this kernel over that one) is the median over rounds of the round's ratio. Before each pass a small
matmul wakes torch's threads, as the base products around each site call do in a step.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve import lora_kernel  # noqa: E402

RANK, SLOTS = 16, 8
HIDDEN, INTERMEDIATE, KV, LAYERS = 576, 1536, 192, 30
SITES = [(HIDDEN, [HIDDEN, KV, KV]), (HIDDEN, [HIDDEN]), (HIDDEN, [INTERMEDIATE, INTERMEDIATE]), (INTERMEDIATE, [HIDDEN])]


class Sites:
    """Every site of the model for `rows` one-token rows, factors in `dtype`; `run(threads)` times one pass
    with the rows of each site shared between `threads` threads (as a plan made under torch's count says)."""

    def __init__(self, kernel: lora_kernel.RowKernel, rows: int, dtype: torch.dtype, adapters: int = SLOTS,
                 bf16_dots: bool = False) -> None:
        self.kernel, self.rows = kernel, rows
        slots = torch.arange(rows, dtype=torch.int64) % adapters
        self._rows = lora_kernel.rows_for(None, slots, RANK)
        self._plan = lora_kernel.Plan(lora_kernel.Plan.ROWS, rows, ctypes.addressof(self._rows))
        self._cell = ctypes.c_void_p(ctypes.addressof(self._plan))
        self._keep: list[object] = [slots]
        self.calls: list[tuple[int, int, int]] = []
        g = torch.Generator().manual_seed(0)
        for _ in range(LAYERS):
            for d_in, outs in SITES:
                entries, column = [], 0
                for d_out in outs:
                    a = torch.randn(SLOTS + 1, RANK, d_in, generator=g).to(dtype)
                    b = torch.randn(SLOTS + 1, RANK, d_out, generator=g).to(dtype)
                    factors = lora_kernel.factors_for(a, b, bf16_dots)
                    entries.append(lora_kernel.SiteModule(ctypes.addressof(self._cell), ctypes.addressof(factors),
                                                          column))
                    self._keep += [a, b, factors]
                    column += d_out
                array = (lora_kernel.SiteModule * len(entries))(*entries)
                site = lora_kernel.Site(len(entries), d_in, column, ctypes.addressof(array))
                x, y = torch.randn(rows, d_in, generator=g), torch.zeros(rows, column)
                self._keep += [array, site, x, y]
                self.calls.append((ctypes.addressof(site), x.data_ptr(), y.data_ptr()))

    def run(self, threads: int, kernel: lora_kernel.RowKernel | None = None) -> float:
        """`kernel`: another build to time over the same factors, inputs and outputs."""
        self._plan.threads = threads
        site, rows = (kernel or self.kernel).site, self.rows
        start = time.perf_counter()
        for address, x, y in self.calls:
            site(address, rows, x, y)
        return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--adapters", type=int, default=SLOTS, choices=range(1, SLOTS + 1),
                    help="distinct slots the rows use, in turn (1: one adapter on every row)")
    ap.add_argument("--against", type=Path, help="another kernel source (csrc/lora_rows.c of another commit)")
    args = ap.parse_args()
    kernel = lora_kernel.build_row_kernel()
    other = lora_kernel.build_row_kernel(source=args.against) if args.against else None
    threads = sorted(set(args.threads))
    print(f"# {platform.machine()}, torch {torch.__version__}; kernel {'with' if kernel.openmp else 'without'} "
          f"OpenMP; SmolLM2-135M's {LAYERS * len(SITES)} sites, r{RANK} factors on {SLOTS} slots, rows on "
          f"{min(args.adapters, max(args.rows))} of them; median of "
          f"{args.rounds} rounds, ms per pass over every site")
    dtypes = {"float32": (torch.float32, False), "bfloat16": (torch.bfloat16, False)}
    if kernel.bf16_dots and (other is None or other.bf16_dots):
        dtypes["bf16 dots"] = (torch.bfloat16, True)
    print(f"{'rows':>4} " + " ".join(f"{f'{d} {t}T':>14}" for d in dtypes for t in threads)
          + " " + " ".join(f"{f'{d} {threads[-1]}T/1T':>16}" for d in dtypes if threads[0] == 1 and len(threads) > 1)
          + (" " + " ".join(f"{f'{d} {t}T vs other':>18}" for d in dtypes for t in threads) if other else ""))
    wake = torch.randn(64, 64)
    for rows in args.rows:
        sites = {d: Sites(kernel, rows, dtype, args.adapters, dots) for d, (dtype, dots) in dtypes.items()}
        times: dict[tuple[str, int], list[float]] = {(d, t): [] for d in dtypes for t in threads}
        against: dict[tuple[str, int], list[float]] = {(d, t): [] for d in dtypes for t in threads} if other else {}
        for n in range(args.rounds + 2):
            for (d, t), runs in times.items():
                builds = ((kernel, runs), (other, against.get((d, t))))
                for build, into in builds if n % 2 == 0 else builds[::-1]:  # the second finds the first's reads in cache
                    if into is not None:
                        torch.set_num_threads(t)
                        torch.mm(wake, wake)
                        into.append(sites[d].run(t, build))
        med = {k: statistics.median(v[2:]) * 1e3 for k, v in times.items()}  # two rounds to warm up
        line = f"{rows:>4} " + " ".join(f"{med[d, t]:>14.2f}" for d in dtypes for t in threads)
        if threads[0] == 1 and len(threads) > 1:
            ratio = {d: statistics.median(a / b for a, b in zip(times[d, threads[-1]][2:], times[d, 1][2:],
                                                                strict=True)) for d in dtypes}
            line += " " + " ".join(f"{ratio[d]:>16.3f}" for d in dtypes)
        if against:
            line += " " + " ".join(f"{statistics.median(a / b for a, b in zip(times[k][2:], v[2:], strict=True)):>18.3f}"
                                   for k, v in against.items())
        print(line)


if __name__ == "__main__":
    main()
