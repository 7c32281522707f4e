"""What an adapter row costs against a base row on the engine's own decode path, and what it must cost at least.

    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py                      # the embedded SmolLM2-135M
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --shape llama-1b     # random weights, TinyLlama's shape
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --loaded 64          # also with 56 more adapters resident
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --torch-too          # the kernel against torch's matmuls
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --call-cost          # ... and against the calls alone
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --separate-calls     # ... and with a call of their own
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --lora-dtype bfloat16  # factors stored in bfloat16
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --matmul-dtype bfloat16  # the base's products too
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --matmul-dtype bfloat16 --lora-dtype bfloat16 --widened-too
    git show HEAD~1:rahf_serve/csrc/lora_rows.c > /tmp/old.c
    OMP_NUM_THREADS=1 python benchmarks/adapter_row_bench.py --against /tmp/old.c  # this row kernel against another

The engine's path: a packed decode step (one token per row) through a `SlotCache` with `LoraSlots`, on the
forward `Engine._forward` runs (`PackedLlama` for llama bases), with the slots set once per step as the
engine does. Adapters, eight names alternating between two r16 shapes like the shipped bundles': on every
Linear (Dual's) and on q/k/v/o (SCIT's); on SmolLM2 the shipped bundles themselves, on a synthetic shape
random factors of those shapes (speed does not depend on the values). Layouts per batch size: every row
the base, every row one adapter ("same"), row i adapter i % 8 ("mixed"). The layouts alternate within
every run, so load swings on a shared machine hit them alike; a time is the median over runs of the mean
step time, a ratio the median over runs of that run's ratio (beside the one-adapter and mixed ratios, "95%":
the distribution-free 95% interval of that median). Rows start with 256 tokens of context.
"walk": base rows with the forward's LoRA path on, i.e. what looking for LoRA work costs when there is none.

The floor, measured in the same runs: a step cannot read the LoRA factors its rows use faster than this
machine streams memory. Each run also times one matrix-vector product over a buffer of as many bytes
as the layout's factors (each distinct slot's A and B, in each module where it has weights, in the slots'
dtype): what those bytes cost at best. The floor is (base step + that) / base step; a layout gets below it only as far as
its reads overlap with compute, which a memory-bound decode step leaves little room for.

Adapter rows run through the C row kernel (`rahf_serve.lora_kernel`) where it builds, as in the engine;
`--torch-too` also times "same" and "mixed" with torch's batched matmuls in every run (the kernel off),
so the two are compared interleaved. `--call-cost` also times them with a C function that does nothing in
the kernel's place: what the per-module calls cost without the kernel's work. A run times every case once,
the next run in the reverse order, so what a case's place in a run costs (the case before it, a slower
first step) falls on every case alike; ratios are medians over runs of the ratio within a run.

`--separate-calls` also times "same" and "mixed" with each site's rows added by a call of their own after
its product, as before the products made that call themselves in C, and reports the products' way over
that one (paired within runs).

`--widened-too` (bfloat16 products and factors, whose adapter rows then multiply in bfloat16 dot products):
also times "same" and "mixed" with the factors widened to float32 arithmetic instead, interleaved, and
reports the dot products' time over that one (paired within runs).

`--against FILE`: also times "same" and "mixed" with the row kernel built from another source (csrc/lora_rows.c
of another commit, whose structs must be this one's) in this one's place, interleaved, and reports this
kernel's steps over that one's (paired within runs) with the median's 95% interval: a kernel change measured
in the step itself, where runs in separate processes differ by more than most kernel changes.

`--loaded N`: every run also loads N - 8 more adapters (slots the layouts do not use), times the three
layouts again and unloads them, so "N loaded / 8 loaded" compares the same work, interleaved, with only
the number of resident adapters changed.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rahf_serve.bundle import read_bundle  # noqa: E402
from rahf_serve.engine import MATMUL_DTYPES  # noqa: E402
from rahf_serve.kvcache import SlotCache, pack_inputs  # noqa: E402
from rahf_serve.lora_kernel import FACTOR_DTYPES, RowKernel, build_row_kernel  # noqa: E402
from rahf_serve.lora_slots import LoraSlots, LoraWeights, read_lora  # noqa: E402
from rahf_serve.models import load_base  # noqa: E402
from rahf_serve.packed_llama import PackedLlama, packed_forward_for  # noqa: E402
from training.stats import median_interval  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [ROOT / "adapters" / "smollm2-135m-rahf-dual", ROOT / "adapters" / "smollm2-135m-rahf-scit"]
CONTEXT = 256
RANK = 16
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    # TinyLlama-1.1B's shape (hidden 2048, 22 layers, 4 key/value heads): 4.4 GB of float32 weights.
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                     num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
}


def synthetic(shape: str) -> torch.nn.Module:
    """A llama of `shape` with random weights (no download; what is timed does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.uniform_(-0.02, 0.02, generator=g)
        model.model.rotary_emb.inv_freq.copy_(model.model.rotary_emb.original_inv_freq)
    return model.eval().requires_grad_(False)


def random_lora(model: torch.nn.Module, targets: tuple[str, ...], seed: int) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for path, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and path.rsplit(".", 1)[-1] in targets:
            modules[path] = (torch.randn(RANK, m.in_features, generator=g) * 0.01,
                             torch.randn(m.out_features, RANK, generator=g) * 0.01)
    return LoraWeights(modules)


def decode(model: torch.nn.Module, packed: PackedLlama | None, cache: SlotCache, slots: LoraSlots,
           layout: list[int | None], steps: int, walk: bool = False) -> float:
    """Mean time of `steps` packed decode steps, one token per row, row i on LoRA slot layout[i]; `walk`:
    the packed forward runs its LoRA path even when no row uses a slot (what that path costs alone)."""
    rows = len(layout)
    ids = pack_inputs([[1]] * rows, "cpu")
    start = time.perf_counter()
    for _ in range(steps):
        step = cache.begin_step([1] * rows)
        slots.set_rows(layout, [1] * rows)  # as the engine does, once per step
        if packed is not None:
            packed(ids, step, cache, {}, False, walk or slots.active)
        else:
            with cache.attending(model):
                model(input_ids=ids, attention_mask=step.attention_mask, position_ids=step.position_ids,
                      cache=cache, use_cache=True, logits_to_keep=step.logits_to_keep)
        slots.clear_rows()
        cache.end_step()
    return (time.perf_counter() - start) / steps


def timed(into: list[float], swaps: list[tuple[object, str, object]], *args: object, walk: bool = False) -> None:
    """Append `decode(*args)`'s time to `into`, with each (object, attribute, value) of `swaps` set for it."""
    saved = [(o, name, getattr(o, name)) for o, name, _ in swaps]
    for o, name, value in swaps:
        setattr(o, name, value)
    try:
        into.append(decode(*args, walk=walk))  # type: ignore[arg-type]
    finally:
        for o, name, value in saved:
            setattr(o, name, value)


def factor_count(adapters: list[LoraWeights]) -> int:
    """How many factors a step whose rows use `adapters` (each once) must read: their A and B."""
    return sum(a.numel() + b.numel() for lora in adapters for a, b in lora.modules.values())


def stream(buffer: torch.Tensor) -> float:
    """Seconds to read `buffer` [n, 1024] once (a matrix-vector product: this machine's streaming rate)."""
    ones = torch.ones(buffer.shape[1])
    start = time.perf_counter()
    torch.mv(buffer, ones)
    return time.perf_counter() - start


def no_op_kernel() -> RowKernel:
    """A `lora_rows` module whose functions take the kernel's arguments and do nothing (a site reports its work
    done; so does its C function, which the forward's products call), built as the kernel is."""
    source = Path(tempfile.mkdtemp()) / "noop.c"
    source.write_text(
        "#define PY_SSIZE_T_CLEAN\n#include <Python.h>\n"
        "static PyObject *rows(PyObject *s, PyObject *const *a, Py_ssize_t n) {\n"
        "    for (Py_ssize_t i = 0; i < n; i++) (void)PyLong_AsLongLong(a[i]);\n    Py_RETURN_NONE;\n}\n"
        "static PyObject *site(PyObject *s, PyObject *const *a, Py_ssize_t n) {\n"
        "    for (Py_ssize_t i = 0; i < n; i++) (void)PyLong_AsLongLong(a[i]);\n    Py_RETURN_TRUE;\n}\n"
        "static PyMethodDef methods[] = {{\"rows\", (PyCFunction)(void (*)(void))rows, METH_FASTCALL, 0},\n"
        "    {\"site\", (PyCFunction)(void (*)(void))site, METH_FASTCALL, 0}, {0}};\n"
        "static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, \"lora_rows\", 0, -1, methods};\n"
        "static int site_function(const void *s, long long t, const float *x, long long ldx, float *y,\n"
        "                         long long ldy) { return 1; }\n"
        "PyMODINIT_FUNC PyInit_lora_rows(void) {\n"
        "    PyObject *m = PyModule_Create(&module);\n"
        "    if (m) PyModule_AddObject(m, \"site_function\", PyLong_FromVoidPtr((void *)site_function));\n"
        "    return m;\n}\n")
    return build_row_kernel(source.parent, source=source)


def in_place_of(kernel: RowKernel, build: RowKernel) -> list[tuple[object, str, object]]:
    """The swaps (for `timed`) that put `build`'s functions in `kernel`'s place: every SlotLinear and SlotSite
    calls through these."""
    return [(kernel, name, getattr(build, name)) for name in ("rows", "site", "site_function")]


def rows_by(kernel: RowKernel | None) -> str:
    if kernel is None:
        return "torch batched matmuls"
    shared = kernel.openmp and torch.get_num_threads() > 1
    return "C row kernel, " + ("sites shared over torch's threads" if shared else "one thread")


def run_ratios(other: list[float], base: list[float]) -> list[float]:
    """Each run's ratio (both timed in the same run, so load swings cancel)."""
    return [o / b for o, b in zip(other, base, strict=True)]


def paired_ratio(other: list[float], base: list[float]) -> float:
    """The median over runs of each run's ratio."""
    return statistics.median(run_ratios(other, base))


def paired_interval(other: list[float], base: list[float]) -> str:
    """The 95% interval of `paired_ratio`'s median, as "low-high"."""
    low, high = median_interval(run_ratios(other, base))
    return f"{low:.3f}-{high:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[8])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--loaded", type=int, default=8,
                    help="also time every layout with this many adapters resident (more than 8), in the same runs")
    ap.add_argument("--shape", choices=["smollm2-135m", *SHAPES], default="smollm2-135m",
                    help="the embedded SmolLM2-135M with the shipped bundles, or a random llama of a larger shape")
    ap.add_argument("--torch-too", action="store_true",
                    help="also time adapter rows with torch's batched matmuls instead of the C kernel, interleaved")
    ap.add_argument("--call-cost", action="store_true",
                    help="also time adapter rows with a no-op in the C kernel's place (the calls alone), interleaved")
    ap.add_argument("--separate-calls", action="store_true",
                    help="also time adapter rows added by a call of their own after each product, interleaved")
    ap.add_argument("--against", type=Path, help="another row kernel source to time in this one's place, interleaved")
    ap.add_argument("--lora-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="what the slots store the factors in (rahf-serve --lora-dtype)")
    ap.add_argument("--matmul-dtype", choices=list(MATMUL_DTYPES), default="float32",
                    help="what the forward's C products multiply in (rahf-serve --matmul-dtype)")
    ap.add_argument("--widened-too", action="store_true",
                    help="also time adapter rows in float32 arithmetic on the bfloat16 factors instead of bfloat16 "
                         "dot products, interleaved (with --matmul-dtype and --lora-dtype bfloat16)")
    args = ap.parse_args()
    if args.shape == "smollm2-135m":
        model = load_base("smollm2-135m-instruct", device="cpu", dtype="float32").model.eval()
        weights = [read_lora(read_bundle(p)) for p in SHIPPED]
        label = "SmolLM2-135M, the shipped Dual (every Linear) and SCIT (q/k/v/o) bundles"
    else:
        model = synthetic(args.shape)
        weights = [random_lora(model, ALL, 0), random_lora(model, ALL[:4], 1)]
        label = f"random {args.shape} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters), " \
                "random r16 LoRAs on every Linear and on q/k/v/o"
    dtype = getattr(torch, args.lora_dtype)
    slots = LoraSlots(model, max_loras=max(8, args.loaded), max_rank=RANK, dtype=dtype,
                      matmul_dtype=MATMUL_DTYPES[args.matmul_dtype])
    kernel = slots.kernel
    if (args.torch_too or args.call_cost or args.separate_calls or args.against) and kernel is None:
        ap.error("--torch-too, --call-cost, --separate-calls and --against need the C row kernel, which is not "
                 "available here (see the log)")
    if args.widened_too and not slots.bf16_dots:
        ap.error("--widened-too compares bfloat16 dot products, which need --matmul-dtype and --lora-dtype bfloat16 "
                 "and a CPU with AVX512_BF16")
    calls_only = no_op_kernel() if args.call_cost else None
    other = build_row_kernel(Path(tempfile.mkdtemp()), source=args.against) if args.against else None
    for i in range(8):
        slots.load_weights(f"a{i}", weights[i % 2])
    fillers = [f"f{i}" for i in range(8, args.loaded)]
    max_len = CONTEXT + 2 * args.runs * args.steps * 4 * (2 if fillers else 1) + 8
    packed = packed_forward_for(model, max_len, MATMUL_DTYPES[args.matmul_dtype])
    forward = "transformers" if packed is None else "packed-llama"
    print(f"# {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); {label}; fp32, "
          f"factors in {args.lora_dtype}, products in {args.matmul_dtype}"
          f"{' (adapter rows too: bfloat16 dot products)' if slots.bf16_dots else ''}; "
          f"{forward} forward; packed decode steps at {CONTEXT}+ tokens of context; median of {args.runs} runs x "
          f"{args.steps} steps; adapter rows: {rows_by(kernel)}")
    extra = f" {'base, same, mixed: ' + str(args.loaded) + ' loaded / 8':>34}" if fillers else ""
    extra += f" {'torch same/base':>15} {'torch mixed/base':>16}" if args.torch_too else ""
    extra += f" {'calls same/base':>15} {'calls mixed/base':>16}" if args.call_cost else ""
    extra += f" {'same/separate':>13} {'mixed/separate':>14}" if args.separate_calls else ""
    extra += f" {'same vs other':>13} {'95%':>11} {'mixed vs other':>14} {'95%':>11}" if other else ""
    extra += f" {'same dots/widened':>17} {'mixed dots/widened':>18}" if args.widened_too else ""
    print(f"{'rows':>4} {'base ms':>8} {'same ms':>8} {'mixed ms':>9} {'same/base':>9} {'95%':>11} {'mixed/base':>10} "
          f"{'95%':>11} {'floor same':>10} {'floor mixed':>11} {'walk/base':>9}{extra}")
    with torch.inference_mode():
        for rows in args.rows:
            cache = SlotCache.for_model(model, rows, max_len)
            cache.add(rows)
            cache.begin_step([CONTEXT] * rows)  # counts CONTEXT (zero) tokens into every row, no forward
            cache.end_step()
            layouts = {"base": [None] * rows, "same": [slots.slot_of("a0")] * rows,
                       "mixed": [slots.slot_of(f"a{i % 8}") for i in range(rows)]}
            for layout in layouts.values():  # warm-up
                decode(model, packed, cache, slots, layout, 1)
            times: dict[str, list[float]] = {k: [] for k in layouts}
            crowded: dict[str, list[float]] = {k: [] for k in layouts}
            walks: list[float] = []
            torch_times: dict[str, list[float]] = {"same": [], "mixed": []}
            call_times: dict[str, list[float]] = {"same": [], "mixed": []}
            separate_times: dict[str, list[float]] = {"same": [], "mixed": []}
            other_times: dict[str, list[float]] = {"same": [], "mixed": []}
            widened_times: dict[str, list[float]] = {"same": [], "mixed": []}
            floors: dict[str, list[float]] = {"same": [], "mixed": []}
            used = {"same": [weights[0]], "mixed": [weights[i % 2] for i in range(min(rows, 8))]}
            floats = {k: factor_count(used[k]) * dtype.itemsize // 4 for k in floors}  # as many bytes
            buffers = {k: torch.ones(floats[k] // 1024, 1024) for k in floors}

            common = (model, packed, cache, slots)
            arms = [functools.partial(timed, times[kind], [], *common, layout, args.steps)
                    for kind, layout in layouts.items()]
            arms.append(functools.partial(timed, walks, [], *common, layouts["base"], args.steps, walk=True))
            if args.torch_too:
                arms += [functools.partial(timed, torch_times[kind], [(slots, "kernel", None)], *common, layouts[kind],
                                           args.steps) for kind in torch_times]
            for build, into in ((calls_only, call_times), (other, other_times)):
                if build is not None:
                    arms += [functools.partial(timed, into[kind], in_place_of(kernel, build), *common, layouts[kind],
                                               args.steps) for kind in into]
            if args.separate_calls:  # SlotSite.call is then None: the site's own `add` after the product
                arms += [functools.partial(timed, separate_times[kind], [(kernel, "site_function", 0)], *common,
                                           layouts[kind], args.steps) for kind in separate_times]
            if args.widened_too:  # each module's factors as the kernel reads them: bfloat16, float32 arithmetic
                widened = [(m._factors_struct, "dtype", FACTOR_DTYPES.index(torch.bfloat16))
                           for m in slots._wrapped.values()]
                arms += [functools.partial(timed, widened_times[kind], widened, *common, layouts[kind], args.steps)
                         for kind in widened_times]
            for run in range(args.runs):
                # forward, then backward: whatever a case's place in the run costs falls on each case alike
                for arm in arms if run % 2 == 0 else arms[::-1]:
                    arm()
                for kind in floors:  # the bytes' cost over the base step of the same run
                    floors[kind].append(1 + stream(buffers[kind]) / times["base"][-1])
                if fillers:
                    for i, name in enumerate(fillers):
                        slots.load_weights(name, weights[i % 2])
                    for kind, layout in layouts.items():
                        crowded[kind].append(decode(model, packed, cache, slots, layout, args.steps))
                    for name in fillers:
                        slots.unload(name)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            floor = {k: statistics.median(v) for k, v in floors.items()}
            paired = functools.partial(paired_ratio, base=times["base"])
            print(f"{rows:>4} {med['base']:>8.1f} {med['same']:>8.1f} {med['mixed']:>9.1f} "
                  f"{paired(times['same']):>9.3f} {paired_interval(times['same'], times['base']):>11} "
                  f"{paired(times['mixed']):>10.3f} {paired_interval(times['mixed'], times['base']):>11} "
                  f"{floor['same']:>10.3f} {floor['mixed']:>11.3f} "
                  f"{paired(walks):>9.3f}", end="")
            if fillers:  # per run, then the median: both counts ran in the same run
                ratio = {k: paired_ratio(crowded[k], times[k]) for k in layouts}
                print(f" {ratio['base']:>12.3f} {ratio['same']:>6.3f} {ratio['mixed']:>6.3f}", end="")
            if args.torch_too:
                print(f" {paired(torch_times['same']):>15.3f} {paired(torch_times['mixed']):>16.3f}", end="")
            if calls_only is not None:
                print(f" {paired(call_times['same']):>15.3f} {paired(call_times['mixed']):>16.3f}", end="")
            if args.separate_calls:
                print(f" {paired_ratio(times['same'], separate_times['same']):>13.3f} "
                      f"{paired_ratio(times['mixed'], separate_times['mixed']):>14.3f}", end="")
            if other is not None:
                print(f" {paired_ratio(times['same'], other_times['same']):>13.3f} "
                      f"{paired_interval(times['same'], other_times['same']):>11} "
                      f"{paired_ratio(times['mixed'], other_times['mixed']):>14.3f} "
                      f"{paired_interval(times['mixed'], other_times['mixed']):>11}", end="")
            if args.widened_too:
                print(f" {paired_ratio(times['same'], widened_times['same']):>17.3f} "
                      f"{paired_ratio(times['mixed'], widened_times['mixed']):>18.3f}", end="")
            print()


if __name__ == "__main__":
    main()
