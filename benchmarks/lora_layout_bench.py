"""Ways to add eight different LoRAs to the decode rows of one step, on SmolLM2-135M's q/k/v/o shapes.

    OMP_NUM_THREADS=1 python benchmarks/lora_layout_bench.py --rows 8 --rounds 80

Synthetic tensors with the real shapes (30 layers x q 576->576, k/v 576->192, o 576->576, rank 16,
8 slots plus the all-zero one, row i on slot i % 8). Each layout runs the 120 base Linear layers and
adds its LoRA; every round runs every layout once, and each layout is reported as the median over
rounds of its time over the base Linear layers' time in the same round, so a shared machine's load
swings cancel.
- gather: each row's A and B gathered (`index_select`), its input gathered, two batched matmuls, the
  output scattered back (`SlotLinear._packed_rows` for one-token rows)
- gather, views: the same, but the rows' inputs and outputs as views (decode rows are contiguous)
- per slot: a loop over the slots in use, each slot's factors used in place
- per row, mv: two matrix-vector products per row, factors in place
- band: the rows' slots as one range of views, one batched matmul each way, factors in place (what
  `SlotLinear` does for one-token rows on nearby slots; here row i on slot i)
- C kernel: `rahf_serve.lora_kernel`'s row kernel, one call per layer for all rows, factors in place (what
  `SlotLinear` does for one-token rows on float32 CPU models where it builds)
- floor: the base layers plus one matrix-vector product over a buffer as large as the factors the rows
  use, i.e. reading those bytes at this machine's streaming rate
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.lora_kernel import factors_for, row_kernel, rows_for  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=80)
    args = ap.parse_args()
    n, S, R = args.rows, args.slots, args.rank
    torch.manual_seed(0)
    dims = [(576, 576), (576, 192), (576, 192), (576, 576)] * 30
    W = [torch.randn(o, i) for i, o in dims]
    A = [torch.randn(S + 1, R, i) for i, _ in dims]
    B = [torch.randn(S + 1, R, o) for _, o in dims]
    xs = [torch.randn(n, i) for i, _ in dims]
    slots = torch.arange(n) % S
    tokens = torch.arange(n)
    rows = [(int(slots[r]), r) for r in range(n)]

    def base() -> None:
        for w, x in zip(W, xs, strict=True):
            F.linear(x, w)

    def gather() -> None:
        for w, x, a, b in zip(W, xs, A, B, strict=True):
            out = F.linear(x, w)
            h = torch.bmm(x.index_select(0, tokens)[:, None], a.index_select(0, slots).transpose(1, 2))
            out.index_add_(0, tokens, torch.bmm(h, b.index_select(0, slots))[:, 0])

    def gather_views() -> None:
        for w, x, a, b in zip(W, xs, A, B, strict=True):
            out = F.linear(x, w)
            h = torch.bmm(x[:, None], a.index_select(0, slots).transpose(1, 2))
            out[:, None].baddbmm_(h, b.index_select(0, slots))

    def per_slot() -> None:
        for w, x, a, b in zip(W, xs, A, B, strict=True):
            out = F.linear(x, w)
            for s in range(S):
                idx = (slots == s).nonzero().flatten()
                out.index_add_(0, idx, torch.mm(torch.mm(x.index_select(0, idx), a[s].t()), b[s]))

    def band() -> None:
        for w, x, a, b in zip(W, xs, A, B, strict=True):
            out = F.linear(x, w)
            out.add_(torch.bmm(torch.bmm(x[:, None], a[:n].transpose(1, 2)), b[:n])[:, 0])

    factors = torch.ones(sum(a[:min(n, S)].numel() + b[:min(n, S)].numel() for a, b in zip(A, B, strict=True)) // 1024,
                         1024)
    ones = torch.ones(1024)

    def floor() -> None:
        base()
        torch.mv(factors, ones)

    def per_row_mv() -> None:
        for w, x, a, b in zip(W, xs, A, B, strict=True):
            out = F.linear(x, w)
            for s, r in rows:
                torch.addmv(out[r], b[s].t(), torch.mv(a[s], x[r]), out=out[r])

    kernel = row_kernel()
    kernel_rows = rows_for(None, slots, R)
    kernel_factors = [factors_for(a, b) for a, b in zip(A, B, strict=True)]  # made once, as SlotLinear does
    rows_at, factors_at = ctypes.addressof(kernel_rows), [ctypes.addressof(f) for f in kernel_factors]

    def c_kernel() -> None:
        for w, x, f in zip(W, xs, factors_at, strict=True):
            out = F.linear(x, w)
            kernel.rows(rows_at, f, x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0))  # type: ignore[union-attr]

    layouts = {"base": base, "gather": gather, "gather, views": gather_views, "per slot": per_slot,
               "per row, mv": per_row_mv, "floor": floor}
    if n <= S:  # row i on slot i: the rows' slots are one range
        layouts["band"] = band
    if kernel is not None:
        layouts["C kernel"] = c_kernel
    times: dict[str, list[float]] = {k: [] for k in layouts}
    with torch.inference_mode():
        for fn in layouts.values():
            fn()
        for _ in range(args.rounds):
            for name, fn in layouts.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    print(f"# {n} rows on {S} slots, rank {R}, {torch.get_num_threads()} thread(s), {args.rounds} rounds")
    for name, t in times.items():
        ratio = statistics.median(x / y for x, y in zip(t, times["base"], strict=True))
        print(f"{name:14s} {statistics.median(t) * 1e3:7.1f} ms   {ratio:.2f}x the base Linear layers")


if __name__ == "__main__":
    main()
