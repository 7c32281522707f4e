"""The C row kernel (rahf_serve/csrc/lora_rows.c): its products against float64 references, its build cache,
and what happens where it cannot be built."""

from __future__ import annotations

import copy
import ctypes
import itertools
import threading

import pytest
import torch

from rahf_serve import c_extension, lora_kernel
from rahf_serve.c_extension import KernelUnavailable
from rahf_serve.errors import RahfError
from rahf_serve.lora_kernel import build_row_kernel
from rahf_serve.lora_slots import LoraSlots, LoraWeights, SlotSite
from tests.helpers import built_for
from tests.serving.conftest import bf16_build, isas_here, lets_other_threads_run, load_lively


@pytest.fixture(scope="module", params=isas_here())
def kernel(request, tmp_path_factory) -> lora_kernel.RowKernel:
    return built_for(request.param, lambda: build_row_kernel(tmp_path_factory.mktemp("kernels")))


@pytest.fixture(scope="module")
def dots_kernel(tmp_path_factory) -> lora_kernel.RowKernel:
    return bf16_build(lambda: build_row_kernel(tmp_path_factory.mktemp("kernels")), lambda k: k.bf16_dots)


def reference(x, y, rows, A, B, r):
    """y[t] + B_s[:r]^T (A_s[:r] x[t]) for each row (t, s), in float64."""
    want = y.double().clone()
    for t, s in rows:
        want[t] += B[s, :r].double().t() @ (A[s, :r].double() @ x[t].double())
    return want


@pytest.mark.parametrize("r", [1, 3, 4, 7, 8, 12, 13, 16])
@pytest.mark.parametrize("positions", ["first", "scattered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("d_in", "d_out"), [(37, 23), (64, 64), (70, 150)])
def test_rows_equal_their_products_and_leave_other_rows_alone(kernel, r, positions, dtype, d_in, d_out):
    """Ranks below, at and past the kernel's eight- and four-rank blocks and their remainders, rows sharing
    slots, ranks below the slots' capacity (16), sizes off and on the vector width, an output that is a
    column slice of a wider one, inputs with a row stride; factors in float32 and in bfloat16 (against the
    float64 products of the factors as stored: widening a bfloat16 is exact)."""
    g = torch.Generator().manual_seed(r)
    slots, capacity = 5, 16
    A = torch.randn(slots, capacity, d_in, generator=g).to(dtype)
    B = torch.randn(slots, capacity, d_out, generator=g).to(dtype)
    x = torch.randn(9, d_in + 5, generator=g)[:, 2:2 + d_in]  # rows d_in + 5 apart
    wide = torch.randn(9, d_out + 11, generator=g)
    y = wide[:, 4:4 + d_out]
    before = wide.clone()
    slot_of = [3, 0, 3, 4, 1]
    tokens = list(range(5)) if positions == "first" else [7, 1, 4, 8, 2]
    want = reference(x, y, list(zip(tokens, slot_of, strict=True)), A, B, r)
    idx, slot_idx = torch.tensor(tokens), torch.tensor(slot_of)
    rows = lora_kernel.rows_for(None if positions == "first" else idx, slot_idx, r)
    factors = lora_kernel.factors_for(A, B)
    kernel.rows(ctypes.addressof(rows), ctypes.addressof(factors), x.data_ptr(), x.stride(0), y.data_ptr(),
                y.stride(0))
    torch.testing.assert_close(y.double(), want, atol=1e-4, rtol=1e-5)
    untouched = [t for t in range(9) if t not in tokens]
    assert torch.equal(wide[untouched], before[untouched])  # rows that are not LoRA rows
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + d_out:], before[:, 4 + d_out:])


@pytest.mark.parametrize("r", [1, 2, 3, 4, 7, 8, 9, 13, 16])
@pytest.mark.parametrize("positions", ["first", "scattered"])
@pytest.mark.parametrize(("d_in", "d_out"), [(37, 23), (64, 64), (70, 150), (576, 1536)])
def test_rows_in_bfloat16_dot_products_multiply_the_rounded_input_and_rank_sums(dots_kernel, r, positions, d_in,
                                                                                 d_out):
    """`--matmul-dtype bfloat16`'s rows: the input and the rank sums rounded to bfloat16, then float32 sums of
    exact products of bfloat16 pairs. Integer A and inputs an integer plus 2^-10 (which bfloat16 rounds
    away) make every rank sum exact in float32, so its rounding is known and the result is float64's over
    the rounded operands up to float32's sums: not the unrounded input's, nor the unrounded sums'. Odd
    ranks (a last rank paired with zero), inputs and outputs off the 32- and 16-wide vectors, the
    four-rank and four-pair blocks and their remainders, a strided input and a column-slice output."""
    g = torch.Generator().manual_seed(100 + r)
    A = torch.randint(-4, 5, (5, 16, d_in), generator=g).bfloat16()
    B = torch.randn(5, 16, d_out, generator=g).bfloat16()
    whole = torch.randint(1, 9, (9, d_in + 5), generator=g) * (torch.randint(0, 2, (9, d_in + 5), generator=g) * 2 - 1)
    x = (whole + 2.0**-10)[:, 2:2 + d_in]  # rows d_in + 5 apart
    wide = torch.randn(9, d_out + 11, generator=g)
    y, before = wide[:, 4:4 + d_out], wide.clone()
    slot_of = [3, 0, 3, 3, 3, 4, 3]  # a run of four on one slot, as the kernel groups them
    tokens = list(range(7)) if positions == "first" else [7, 1, 4, 8, 2, 0, 5]
    pairs = list(zip(tokens, slot_of, strict=True))
    idx, slot_idx = torch.tensor(tokens), torch.tensor(slot_of)
    rows = lora_kernel.rows_for(None if positions == "first" else idx, slot_idx, r)
    factors = lora_kernel.factors_for(A, B, bf16_dots=True)
    dots_kernel.rows(ctypes.addressof(rows), ctypes.addressof(factors), x.data_ptr(), x.stride(0), y.data_ptr(),
                     y.stride(0))
    y0 = before[:, 4:4 + d_out].double()
    want = y0.clone()
    bound = y0.abs()  # what float32's sums can be off by, in units of their rounding
    for t, s in pairs:
        h = (A[s, :r].double() @ x[t].bfloat16().double()).bfloat16().double()
        want[t] += B[s, :r].double().t() @ h
        bound[t] += B[s, :r].double().abs().t() @ h.abs()
    assert ((y.double() - want).abs() <= 1e-5 * bound).all()
    assert ((y.double() - reference(x, y0, pairs, A, B, r)).abs() > 1e-5 * bound).any()  # not float32's products
    untouched = [t for t in range(9) if t not in tokens]
    assert torch.equal(wide[untouched], before[untouched])
    assert torch.equal(wide[:, :4], before[:, :4]) and torch.equal(wide[:, 4 + d_out:], before[:, 4 + d_out:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_on_one_slot_done_together_give_each_row_what_it_gets_alone(kernel, dtype):
    """Rows side by side on one slot share each read of its factors (in groups of two or four by build) and
    a row's output is bit for bit the same alone, in runs of any length, first, last or in the middle of a
    run, with rows of other slots around it: ranks past the blocks (13), sizes past the vectors (70, 150)."""
    alone = rows_alone_and_together(kernel, dtype)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(3, 16, 70, generator=g).to(dtype)
    B = torch.randn(3, 16, 150, generator=g).to(dtype)
    x, base = torch.randn(12, 70, generator=g), torch.randn(12, 150, generator=g)
    want = reference(x, base, [(t, 1) for t in range(12)], A, B, 13)
    torch.testing.assert_close(alone.double(), want, atol=1e-4, rtol=1e-5)


def test_rows_in_bfloat16_dot_products_on_one_slot_give_each_row_what_it_gets_alone(dots_kernel):
    rows_alone_and_together(dots_kernel, torch.bfloat16, bf16_dots=True)


def rows_alone_and_together(kernel, dtype: torch.dtype, bf16_dots: bool = False) -> torch.Tensor:
    """Asserts each row on slot 1 gets the same alone as in runs on that slot, in the test above's cases, and
    returns the rows alone (the factors and inputs drawn as it draws them)."""
    g = torch.Generator().manual_seed(3)
    d_in, d_out, r = 70, 150, 13
    A = torch.randn(3, 16, d_in, generator=g).to(dtype)
    B = torch.randn(3, 16, d_out, generator=g).to(dtype)
    factors = lora_kernel.factors_for(A, B, bf16_dots)
    x = torch.randn(12, d_in, generator=g)
    base = torch.randn(12, d_out, generator=g)

    def run(tokens: list[int], slots: list[int]) -> torch.Tensor:
        y, positions, slot_of = base.clone(), torch.tensor(tokens), torch.tensor(slots)  # alive through the call
        rows = lora_kernel.rows_for(positions, slot_of, r)
        kernel.rows(ctypes.addressof(rows), ctypes.addressof(factors), x.data_ptr(), x.stride(0), y.data_ptr(),
                    y.stride(0))
        return y

    alone = {t: run([t], [1])[t] for t in range(12)}
    for n in range(1, 11):
        tokens = [(5 + 7 * i) % 12 for i in range(n)]  # scattered, each once
        other = next(t for t in range(12) if t not in tokens)  # a row on another slot before the run
        y = run([other, *tokens], [0, *[1] * n])
        for t in tokens:
            assert torch.equal(y[t], alone[t]), (n, t)
    y = run([0, 1, 2, 3, 4, 5], [2, 1, 1, 2, 1, 1])  # runs of two between rows of another slot
    assert all(torch.equal(y[t], alone[t]) for t in (1, 2, 4, 5))
    return torch.stack([alone[t] for t in range(12)])


def site_of(shapes: list[tuple[int, int]], rows: lora_kernel.Rows, total: int, dtype: torch.dtype, seed: int,
            bf16_dots: bool = False):
    """A site of modules [in, out] reading one input: (address, x, output width, the Python objects the C call
    reads, the plan first); every module's group plans `rows`."""
    g = torch.Generator().manual_seed(seed)
    plan = lora_kernel.Plan(lora_kernel.Plan.ROWS, total, ctypes.addressof(rows))
    cell = ctypes.c_void_p(ctypes.addressof(plan))
    keep: list[object] = [plan, cell]
    entries, column = [], 0
    for d_in, d_out in shapes:
        A = torch.randn(8, 16, d_in, generator=g).to(dtype)
        B = torch.randn(8, 16, d_out, generator=g).to(dtype)
        factors = lora_kernel.factors_for(A, B, bf16_dots)
        keep += [A, B, factors]
        entries.append(lora_kernel.SiteModule(ctypes.addressof(cell), ctypes.addressof(factors), column))
        column += d_out
    array = (lora_kernel.SiteModule * len(entries))(*entries)
    site = lora_kernel.Site(len(entries), shapes[0][0], column, ctypes.addressof(array))
    keep += [array, site]
    return ctypes.addressof(site), torch.randn(total, shapes[0][0], generator=g), column, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_site_shared_between_threads_gives_each_row_what_one_thread_gives(kernel, dtype):
    """Built with OpenMP where torch runs on GNU OpenMP (as here), a site with enough rows shares them between
    as many threads as its plans say, each row done whole by one thread: for any thread count, modules of
    different sizes and rows on different slots (some sharing one, at scattered positions), the output is bit
    for bit what one thread gives, which is each row's products."""
    assert kernel.openmp == c_extension.torch_on_libgomp()
    y, x, (A, B), pairs = site_on_threads(kernel, dtype)
    want = reference(x, torch.zeros(x.shape[0], 96), pairs, A, B, 16)
    torch.testing.assert_close(y[:, :96].double(), want, atol=1e-4, rtol=1e-5)


def test_a_site_in_bfloat16_dot_products_shared_between_threads_gives_what_one_thread_gives(dots_kernel):
    site_on_threads(dots_kernel, torch.bfloat16, bf16_dots=True)


def site_on_threads(kernel, dtype: torch.dtype, bf16_dots: bool = False):
    """Asserts the test above's site gives the same on 1, 2, 3 and 5 threads and nothing to rows that are not
    LoRA rows; returns (output, input, the first module's (A, B), its (row, slot) pairs)."""
    total, positions, slot_of = 13, [0, 2, 3, 5, 6, 7, 8, 10, 11, 12], [3, 0, 7, 1, 1, 4, 6, 2, 5, 0]
    tokens, slots = torch.tensor(positions), torch.tensor(slot_of)
    rows = lora_kernel.rows_for(tokens, slots, 16)
    address, x, width, keep = site_of([(96, 96), (96, 32), (96, 48)], rows, total, dtype, seed=7, bf16_dots=bf16_dots)
    plan, outputs = keep[0], {}
    for n in (1, 2, 3, 5):
        plan.threads = n
        y = torch.zeros(total, width)
        assert kernel.site(address, total, x.data_ptr(), y.data_ptr())
        outputs[n] = y
    assert all(torch.equal(y, outputs[1]) for y in outputs.values())
    assert not outputs[1][[1, 4, 9]].any()  # rows that are not LoRA rows
    return outputs[1], x, (keep[2], keep[3]), list(zip(positions, slot_of, strict=True))


def test_the_kernel_s_calls_let_the_server_s_other_threads_run(kernel):
    """Its calls touch no Python object while they work, so they let go of the GIL: a module's rows and a
    site (a forward product's own call releases it for both)."""
    total = 4096  # rows at 64 positions, over and over: tens of ms
    tokens, slots = torch.arange(total) % 64, torch.arange(total) % 8
    rows = lora_kernel.rows_for(tokens, slots, 16)
    address, x, width, keep = site_of([(2048, 2048), (2048, 2048)], rows, 64, torch.float32, seed=3)
    keep[0].threads = 1
    y = torch.zeros(64, width)
    module = lora_kernel.factors_for(keep[2], keep[3])
    assert lets_other_threads_run(lambda: kernel.rows(ctypes.addressof(rows), ctypes.addressof(module), x.data_ptr(),
                                                      x.stride(0), y.data_ptr(), y.stride(0)))
    assert lets_other_threads_run(lambda: kernel.site(address, 64, x.data_ptr(), y.data_ptr()))


def test_plans_carry_torch_s_thread_count_to_the_thread_that_runs_the_forward(lively_model_dir):
    """A site shares its rows between as many threads as torch's products use: the count a plan carries is
    torch's, also on a thread that has not run a parallel loop yet, whose own OpenMP setting is still the
    number of cores (as the engine's thread is before its first big product)."""
    slots, module, _, _ = one_module_adapter(lively_model_dir, "model.layers.0.self_attn.q_proj")
    threads, seen = torch.get_num_threads(), []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            worker = threading.Thread(target=lambda: (slots.set_rows([slots.slot_of("one")], [1]),
                                                      seen.append(module.rows.view.threads)))
            worker.start()
            worker.join()
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 3]


def test_sites_run_on_one_thread_where_torch_has_no_gnu_openmp_or_that_build_fails(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(c_extension, "torch_on_libgomp", lambda: False)
    assert not build_row_kernel(tmp_path / "a").openmp
    monkeypatch.setattr(c_extension, "torch_on_libgomp", lambda: True)
    compile_ = c_extension._compile

    def no_openmp(cc, flags, *args):
        if "-fopenmp" in flags:
            raise KernelUnavailable("cc failed (1): unrecognized command-line option '-fopenmp'")
        compile_(cc, flags, *args)

    monkeypatch.setattr(c_extension, "_compile", no_openmp)
    with caplog.at_level("INFO", logger="rahf_serve.c_extension"):
        kernel = build_row_kernel(tmp_path / "b")
    assert not kernel.openmp and "without OpenMP" in caplog.text and "-fopenmp" in caplog.text


def test_where_they_cannot_run_bfloat16_dot_products_are_refused(kernel):
    """A build without AVX-512 (or a CPU without AVX512_BF16) says so; asked anyway, a module's rows raise and
    a site does nothing (its caller then takes torch's path) rather than run an instruction the CPU lacks."""
    A, B = torch.ones(2, 4, 8, dtype=torch.bfloat16), torch.ones(2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 factors, not torch.float32"):
        lora_kernel.factors_for(A.float(), B.float(), bf16_dots=True)
    if kernel.bf16_dots:  # the AVX-512 build here: `dots_kernel`'s tests run them
        return
    positions, slots = torch.tensor([0]), torch.tensor([1])
    rows = lora_kernel.rows_for(positions, slots, 4)
    factors = lora_kernel.factors_for(A, B, bf16_dots=True)
    x, y = torch.ones(1, 8), torch.zeros(1, 8)
    with pytest.raises(RuntimeError, match="AVX512_BF16"):
        kernel.rows(ctypes.addressof(rows), ctypes.addressof(factors), x.data_ptr(), 8, y.data_ptr(), 8)
    address, x, width, keep = site_of([(8, 8)], rows, 1, torch.bfloat16, seed=1, bf16_dots=True)
    y = torch.zeros(1, width)
    assert not kernel.site(address, 1, x.data_ptr(), y.data_ptr()) and not y.any()


def test_the_kernel_reads_only_factors_it_knows(kernel):
    A, B = torch.zeros(2, 4, 8, dtype=torch.float16), torch.zeros(2, 4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or bfloat16 factors, not torch.float16"):
        lora_kernel.factors_for(A, B)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        lora_kernel.factors_for(A.float(), B.bfloat16())


AVX512_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=256"]


@pytest.mark.parametrize(("isa", "wanted"), [
    ("DEFAULT", []), ("AVX2", ["-mavx2", "-mfma"]), ("AVX512", ["-mavx2", "-mfma", *AVX512_FLAGS])])
def test_kernels_are_built_for_the_instructions_torch_found(monkeypatch, isa, wanted):
    """An x86 build uses what torch found (AVX2 and FMA; AVX-512 too where it found it), nothing past it."""
    monkeypatch.setattr(c_extension.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)
    assert [f for f in c_extension.flags() if f.startswith("-m")] == wanted


def test_the_build_is_cached_and_leaves_no_partial_files(tmp_path):
    first = build_row_kernel(tmp_path)
    built = first.path.stat().st_mtime_ns
    second = build_row_kernel(tmp_path)
    assert second.path == first.path and second.path.stat().st_mtime_ns == built
    assert build_row_kernel(tmp_path, compiler="no-such-cc").path == first.path  # a cached build needs no compiler
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]


def test_a_missing_or_failing_compiler_or_missing_headers_are_named(tmp_path, monkeypatch):
    with pytest.raises(KernelUnavailable, match="no C compiler .*no-such-cc"):
        build_row_kernel(tmp_path, compiler="no-such-cc")
    with pytest.raises(KernelUnavailable, match="false failed"):
        build_row_kernel(tmp_path, compiler="false")
    monkeypatch.setattr(c_extension, "include", lambda: str(tmp_path / "include"))  # a Python without its headers
    with pytest.raises(KernelUnavailable, match="no Python headers .*python3-dev"):
        build_row_kernel(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_the_kernel_refuses_calls_it_cannot_read(kernel):
    with pytest.raises(TypeError, match="site takes 4 ints \\(2 given\\)"):
        kernel.site(1, 2)
    with pytest.raises(TypeError):
        kernel.rows(1, 2, 3, 4, 5, "y")


def test_without_the_kernel_slots_use_torch_and_say_why(lively_model_dir, monkeypatch, caplog):
    base = load_lively(lively_model_dir)
    monkeypatch.setattr(lora_kernel._kernel, "_built", [])  # as in a fresh process
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("RAHF_SERVE_CACHE", "/nonexistent-cache")  # nothing cached to fall back on
    with caplog.at_level("WARNING", logger="rahf_serve.lora_kernel"):
        slots = LoraSlots(copy.deepcopy(base.model), max_loras=2, max_rank=4)
    assert slots.kernel is None
    assert "LoRA row kernel unavailable" in caplog.text and "no-such-cc" in caplog.text
    monkeypatch.setattr(lora_kernel._kernel, "_built", [])
    monkeypatch.setenv("RAHF_LORA_KERNEL", "0")
    assert LoraSlots(copy.deepcopy(base.model), max_loras=2, max_rank=4).kernel is None


def test_insisting_on_the_kernel_for_a_model_it_cannot_run_is_refused(lively_model_dir):
    model = copy.deepcopy(load_lively(lively_model_dir).model).to(torch.bfloat16)
    with pytest.raises(RahfError, match="float32 CPU models, not torch.bfloat16"):
        LoraSlots(model, max_loras=2, max_rank=4, kernel=True)
    assert LoraSlots(model, max_loras=2, max_rank=4).kernel is None  # chosen automatically: torch's products


def test_factors_the_kernel_cannot_read_go_through_torch_and_say_so(lively_model_dir, caplog):
    model = copy.deepcopy(load_lively(lively_model_dir).model)
    with pytest.raises(RahfError, match="float32 or bfloat16 factors, not torch.float16"):
        LoraSlots(model, max_loras=2, max_rank=4, kernel=True, dtype=torch.float16)
    with caplog.at_level("WARNING", logger="rahf_serve.lora_slots"):
        slots = LoraSlots(model, max_loras=2, max_rank=4, dtype=torch.float16)
    assert slots.kernel is None and "LoRA factors in torch.float16" in caplog.text


def one_module_adapter(model_dir, path: str) -> tuple[LoraSlots, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """Slots (with the kernel) holding "one", a random rank-4 LoRA on the module at `path` alone; the module,
    A and B."""
    slots = LoraSlots(copy.deepcopy(load_lively(model_dir).model), max_loras=2, max_rank=4, kernel=True)
    linear = slots.model.get_submodule(path)
    a, b = torch.randn(4, linear.in_features), torch.randn(linear.out_features, 4)
    slots.load_weights("one", LoraWeights({path: (a, b)}))
    return slots, slots.model.get_submodule(path), a, b


def test_rows_that_do_not_match_the_step_are_refused_before_the_kernel_runs(lively_model_dir):
    """The kernel indexes rows without checks: inputs or outputs of another token count than the step's
    are an error, not a write past the end."""
    slots, module, a, b = one_module_adapter(lively_model_dir, "model.layers.0.self_attn.q_proj")
    slots.set_rows([slots.slot_of("one"), None], [1, 1])
    x, out = torch.randn(2, module.in_features), torch.zeros(2, module.out_features)
    module.add_packed(x, out)
    torch.testing.assert_close(out[0], b @ (a @ x[0]), atol=1e-5, rtol=1e-5)
    assert not out[1].any()
    for bad_x, bad_out in ((x[:1], out), (x, out[:1])):
        with pytest.raises(RuntimeError, match="set for 2 tokens"):
            module.add_packed(bad_x, bad_out)


def test_a_site_adds_its_modules_rows_in_one_call_and_follows_a_regrouping(lively_model_dir):
    """`SlotSite` (the packed forward's q/k/v, o, gate/up, down) adds a step's rows of modules in different
    groups as each module's `add_packed` does, at its columns, a prompt chunk's tokens as one-token rows
    (the same as fed one by one); its C call declines, doing nothing, a step planned for another token
    count (then `add_packed` does it); and a load that moves a module into another group after the site
    was made is followed."""
    slots = LoraSlots(copy.deepcopy(load_lively(lively_model_dir).model), max_loras=4, max_rank=4, kernel=True)
    attn = "model.layers.0.self_attn."

    def lora(names: list[str], seed: int) -> LoraWeights:
        g = torch.Generator().manual_seed(seed)
        shapes = {n: slots.model.get_submodule(attn + n) for n in names}
        return LoraWeights({attn + n: (torch.randn(4, m.in_features, generator=g),
                                       torch.randn(m.out_features, 4, generator=g)) for n, m in shapes.items()})

    slots.load_weights("qv", lora(["q_proj", "v_proj"], 1))
    slots.load_weights("k", lora(["k_proj"], 2))
    modules = [slots.model.get_submodule(attn + n) for n in ("q_proj", "k_proj", "v_proj")]
    bounds = [0, *itertools.accumulate(m.out_features for m in modules)]
    parts = [slice(lo, hi) for lo, hi in itertools.pairwise(bounds)]
    site = SlotSite(modules, parts, bounds[-1])
    x = torch.randn(3, modules[0].in_features)

    def by_site() -> torch.Tensor:
        out = torch.zeros(3, bounds[-1])
        site.add(x, out, 3)
        return out

    def by_modules() -> torch.Tensor:
        out = torch.zeros(3, bounds[-1])
        for module, part in zip(modules, parts, strict=True):
            module.add_packed(x, out, part)
        return out

    def c_call(total: int) -> tuple[int, torch.Tensor]:
        out = torch.zeros(3, bounds[-1])
        done = slots.kernel.site(site._address, total, x.data_ptr(), out.data_ptr())
        return done, out

    qv, k = slots.slot_of("qv"), slots.slot_of("k")
    slots.set_rows([None, qv, k], [1, 1, 1])
    out = by_site()
    assert torch.equal(out, by_modules()) and not out[0].any()
    q_cols, k_cols, v_cols = parts
    assert out[1, q_cols].any() and out[1, v_cols].any() and not out[1, k_cols].any()
    assert out[2, k_cols].any() and not out[2, q_cols].any() and not out[2, v_cols].any()
    assert c_call(3)[0] == 1
    done, out = c_call(4)
    assert done == 0 and not out.any()
    slots.set_rows([qv, None], [2, 1])  # a prompt chunk: its tokens are the kernel's rows too
    done, out = c_call(3)
    assert done == 1 and torch.equal(out, by_modules()) and out[:2].any() and not out[2].any()
    slots.set_rows([qv, qv, None], [1, 1, 1])
    assert torch.equal(c_call(3)[1], out)

    slots.load_weights("q", lora(["q_proj"], 3))  # q now has weights of a slot v has not: another group
    assert modules[0].rows is not modules[2].rows
    slots.set_rows([slots.slot_of("q"), qv, None], [1, 1, 1])
    out = by_site()
    assert torch.equal(out, by_modules())
    assert out[0, q_cols].any() and not out[0, v_cols].any() and out[1, v_cols].any()
