"""The packed forward with and without its C operators, against the weight-streaming floor.

    OMP_NUM_THREADS=1 python benchmarks/forward_ops_bench.py --threads 1
    python benchmarks/forward_ops_bench.py --rows 1 8 --context 48 2000 --runs 41
    git show <commit>:rahf_serve/csrc/forward_ops.c > /tmp/old.c
    OMP_NUM_THREADS=1 python benchmarks/forward_ops_bench.py --threads 1 --against /tmp/old.c

One process, the real default model in float32: for each (rows, context) a decode step of `rows` one-token
rows whose slots already hold `context` tokens, run by the engine's packed forward with the C operators
(`forward_kernel`: products over panels, norms, rotation with the cache write, one-token attention), with
them but torch's products ("C, torch mm"), and with torch's operators only, and the weight-streaming floor
(every Linear layer's GEMV of one decode step through torch, back to back, as in serve_bench.py), the four
in turn each round. Reports each one's median ms and the medians of the per-round ratios (floor / forward:
the share of the floor reached, over 1 where the C products read the weights faster than torch's GEMVs;
C / the others). The rows' logits of the forwards are compared once with the first's (their largest
difference is printed). No LoRA rows: their cost is adapter_row_bench.py's. `--against FILE`: also the
forward with the C operators built from another source (its own panels), timed in the same rounds;
`--small-pages-too`: also the C forward with its panels in ordinary 4 KB pages (rahf_serve/huge_pages.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.forward_kernel import build_forward_kernel, forward_kernel  # noqa: E402
from rahf_serve.kvcache import SlotCache, pack_inputs  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.packed_llama import PackedLlama  # noqa: E402


def prepared(model: torch.nn.Module, rows: int, context: int, max_len: int,
             generator: torch.Generator) -> SlotCache:
    """A cache of `rows` rows holding `context` tokens each, random keys and values."""
    cache = SlotCache.for_model(model, rows, max_len)
    cache.storage.normal_(generator=generator)
    cache.add(rows)
    cache.begin_step([context] * rows)
    cache.end_step()
    return cache


def step(forward: PackedLlama, cache: SlotCache, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """One decode step of every row (then the rows' lengths put back, so each round decodes at the same
    length): its seconds and logits."""
    rows = cache.rows
    start = time.perf_counter()
    logits, _ = forward(ids, cache.begin_step([1] * rows), cache, {}, lora=False)
    cache.end_step()
    took = time.perf_counter() - start
    for r in range(rows):
        cache._lengths[r] -= 1
    return took, logits


def floor(linears: list[torch.nn.Linear], inputs: list[torch.Tensor], rows: int) -> float:
    start = time.perf_counter()
    for m, x in zip(linears, inputs, strict=True):
        torch.mm(x.expand(rows, -1), m.weight.t())
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8], help="one-token rows per step")
    ap.add_argument("--context", type=int, nargs="+", default=[48, 2000], help="tokens each row already holds")
    ap.add_argument("--runs", type=int, default=41, help="rounds (the first five are warm-up, not counted)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--against", type=Path, help="another forward_ops.c (of another commit) to time beside")
    ap.add_argument("--small-pages-too", action="store_true",
                    help="also the C forward with its panels in ordinary pages (RAHF_HUGE_PAGES=0)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if forward_kernel() is None:
        sys.exit("the forward kernel is unavailable here (see the log line above)")
    model = load_base("smollm2-135m-instruct", device="cpu", dtype="float32").model.eval()
    max_len = max(args.context) + 1
    forwards = {"C": PackedLlama(model, max_len), "C, torch mm": PackedLlama(model, max_len, products=False),
                "torch": PackedLlama(model, max_len, kernel=False)}
    if args.against:
        forwards["against"] = PackedLlama(model, max_len, kernel=build_forward_kernel(source=args.against))
    if args.small_pages_too:
        before = os.environ.get("RAHF_HUGE_PAGES")
        os.environ["RAHF_HUGE_PAGES"] = "0"
        forwards["C, 4 KB pages"] = PackedLlama(model, max_len)
        if before is None:
            del os.environ["RAHF_HUGE_PAGES"]
        else:
            os.environ["RAHF_HUGE_PAGES"] = before
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features) for m in linears]
    generator = torch.Generator().manual_seed(0)
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} "
          f"thread(s); ms per decode step, medians of {args.runs - 5} rounds")
    with torch.inference_mode():
        for rows in args.rows:
            for context in args.context:
                # One cache of random keys and values for every forward (attention's cost does not depend on
                # them): a step writes its own token's key and value before it attends and leaves the rows'
                # lengths as they were, so each forward reads what it wrote, and five forwards' caches of
                # sixteen rows at 2,000 tokens would not fit this project's 24 GB machine.
                cache = prepared(model, rows, context, max_len, generator)
                ids = pack_inputs([[100 + r] for r in range(rows)], "cpu")
                times: dict[str, list[float]] = {"floor": [], **{name: [] for name in forwards}}
                for _ in range(args.runs):
                    times["floor"].append(floor(linears, inputs, rows))
                    for name, forward in forwards.items():
                        times[name].append(step(forward, cache, ids)[0])
                kept = {k: v[5:] for k, v in times.items()}
                logits = [step(forward, cache, ids)[1] for forward in forwards.values()]
                ms = {k: statistics.median(v) * 1e3 for k, v in kept.items()}
                pairs = [("floor", name) for name in forwards] + [("C", name) for name in forwards if name != "C"]
                ratio = {(a, b): statistics.median(x / y for x, y in zip(kept[a], kept[b], strict=True))
                         for a, b in pairs}
                print(f"rows {rows:2d} context {context:5d}: "
                      + "  ".join(f"{name} {ms[name]:6.2f}" for name in ms) + "  "
                      + "  ".join(f"{a}/{b} {ratio[a, b]:.3f}" for a, b in pairs)
                      + f"  max |logit diff| {max((lg - logits[0]).abs().max().item() for lg in logits[1:]):.1e}")


if __name__ == "__main__":
    main()
