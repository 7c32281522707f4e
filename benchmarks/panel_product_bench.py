"""torch's matrix products against the forward kernel's over panels, at the shapes of the default model.

    OMP_NUM_THREADS=1 python benchmarks/panel_product_bench.py
    python benchmarks/panel_product_bench.py --rows 1 8 16 64 --threads 2
    OMP_NUM_THREADS=1 python benchmarks/panel_product_bench.py --against AVX2   # on an AVX-512 machine
    git show <commit>:rahf_serve/csrc/forward_ops.c > /tmp/old.c
    OMP_NUM_THREADS=1 python benchmarks/panel_product_bench.py --against /tmp/old.c   # this kernel against another source
    OMP_NUM_THREADS=1 python benchmarks/panel_product_bench.py --bf16   # and over bfloat16 panels

For each of SmolLM2-135M's products (q/k/v fused, o, gate/up fused, down, the LM head) and each row count:
`x @ W.T` through torch (MKL on x86 wheels) and `ForwardKernel.product` over the same weight's panels,
each over as many copies of the weight as fill ~200 MB, so the weights come from memory as in a decode
step, the two alternating every round. Reports medians over rounds of the time per product, the GFLOP/s
and GB/s they reach, and the median of the per-round ratios torch / C. Random weights: speed does not
depend on the values. `--against ISA` also times, in the same rounds, the kernel built as for a machine
where torch found ISA (DEFAULT, AVX2), over its own panels: what this machine's build gains over it;
`--against FILE`, the kernel built from another forward_ops.c.
`--bf16` also times, in the same rounds, the kernel's bfloat16 products (`--matmul-dtype bfloat16`) over
bfloat16 panels of the same weights, rounding of the rows included: their speed over the float32 ones.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.forward_kernel import build_forward_kernel, forward_kernel  # noqa: E402
from tests.helpers import built_for  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "head": (49152, 576)}
"""[out, in] of SmolLM2-135M's products (q/k/v and gate/up fused as the packed forward runs them)."""


def timed(fn, weights: list) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(w)
    return (time.perf_counter() - start) / len(weights)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 64])
    ap.add_argument("--runs", type=int, default=9, help="rounds, each timing both once per weight copy")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--against", metavar="ISA|FILE",
                    help="also time the kernel built as for this capability, or from this forward_ops.c")
    ap.add_argument("--bf16", action="store_true", help="also time the products over bfloat16 panels")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernel = forward_kernel()
    if kernel is None:
        sys.exit("the forward kernel is unavailable here (see the log line above)")
    if args.bf16 and not kernel.bf16:
        sys.exit("bfloat16 products do not run here: the kernel's AVX2 build, or its AVX-512 build on a CPU with "
                 "AVX512_BF16, runs them")
    other, label = None, args.against
    if args.against and Path(args.against).is_file():
        other, label = build_forward_kernel(source=Path(args.against)), Path(args.against).name
    elif args.against:
        other = built_for(args.against, build_forward_kernel)  # cached beside this machine's build, by its flags
    print(f"# {platform.machine()}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} thread(s); medians of {args.runs} rounds")
    extra = f"  {label} us  {label}/C" if other else ""
    extra += "  bf16 us  bf16 GFLOP/s  C/bf16" if args.bf16 else ""
    print(f"rows  product   torch us  C us   torch GFLOP/s  C GFLOP/s  C GB/s  torch/C{extra}")
    g = torch.Generator().manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        copies = max(2, int(200e6 // (out * inp * 4)))
        weights = [torch.randn(out, inp, generator=g) for _ in range(copies)]
        panels = [kernel.panels(w) for w in weights]
        other_panels = [other.panels(w) for w in weights] if other else []
        bf16_panels = [kernel.panels(w, dtype=torch.bfloat16) for w in weights] if args.bf16 else []
        for rows in args.rows:
            x = torch.randn(rows, inp, generator=g)
            torch_s, c_s, other_s, bf16_s = [], [], [], []
            for _ in range(args.runs):
                torch_s.append(timed(lambda w, x=x: torch.mm(x, w.t()), weights))
                c_s.append(timed(lambda p, x=x, out=out: kernel.product(x, p, out), panels))
                if other:
                    other_s.append(timed(lambda p, x=x, out=out: other.product(x, p, out), other_panels))
                if args.bf16:
                    bf16_s.append(timed(lambda p, x=x, out=out: kernel.product(x, p, out), bf16_panels))
            t, c = statistics.median(torch_s), statistics.median(c_s)
            ratio = statistics.median(a / b for a, b in zip(torch_s, c_s, strict=True))
            flops = 2 * rows * out * inp
            line = (f"{rows:4d}  {name:8s} {t * 1e6:8.0f} {c * 1e6:6.0f}   {flops / t / 1e9:12.1f} "
                    f"{flops / c / 1e9:10.1f} {out * inp * 4 / c / 1e9:7.1f}  {ratio:6.2f}x")
            if other:
                vs = statistics.median(a / b for a, b in zip(other_s, c_s, strict=True))
                line += f"  {statistics.median(other_s) * 1e6:7.0f}  {vs:6.2f}x"
            if args.bf16:
                half = statistics.median(bf16_s)
                vs = statistics.median(a / b for a, b in zip(c_s, bf16_s, strict=True))
                line += f"  {half * 1e6:7.0f}  {flops / half / 1e9:11.1f}  {vs:6.2f}x"
            print(line)


if __name__ == "__main__":
    main()
