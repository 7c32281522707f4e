"""The packed forward's C operators (csrc/forward_ops.c) against torch's: the products over panels, RMSNorm,
the rotation with the KV cache write, one-token rows' attention; and what happens where they cannot be
built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rahf_serve import forward_kernel, kvcache
from rahf_serve.c_extension import torch_on_libgomp
from rahf_serve.forward_kernel import ForwardKernel, build_forward_kernel
from rahf_serve.packed_llama import PackedLlama
from tests.helpers import built_for
from tests.serving.conftest import bf16_build, isas_here, lets_other_threads_run


@pytest.fixture(scope="module", params=isas_here())
def kernel(request, tmp_path_factory) -> ForwardKernel:
    return built_for(request.param, lambda: build_forward_kernel(tmp_path_factory.mktemp("kernels")))


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# blocks of 4, 8 or 9, every rest, and 8 .. 16 rows in chunks of inputs (AVX2's)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 16, 17, 64])
@pytest.mark.parametrize("inp,out", [(576, 960), (37, 23), (70, 150), (64, 24)])  # on and off the panel width
def test_a_product_over_panels_is_torch_s_and_adds_into_a_residual(kernel, tokens, inp, out):
    w, x, residual = randn(out, inp, seed=11), randn(tokens, inp, seed=12), randn(tokens, out, seed=13)
    panels = kernel.panels(w)
    assert panels.shape == (-(-out // kernel.panel), inp, kernel.panel)
    tolerance = {"rtol": 1e-5, "atol": 2e-5 * inp ** 0.5}
    torch.testing.assert_close(kernel.product(x, panels, out), x @ w.t(), **tolerance)
    into = residual.clone()
    assert kernel.product(x, panels, out, into) is into
    torch.testing.assert_close(into, residual + x @ w.t(), **tolerance)


@pytest.fixture(scope="module", params=["AVX2", "AVX512"])
def bf16_kernel(request, tmp_path_factory) -> ForwardKernel:
    """Each build whose bfloat16 products run here: AVX2's fused steps, AVX-512's dot-product instruction."""
    def build():
        return build_forward_kernel(tmp_path_factory.mktemp("kernels"))
    if request.param == "AVX512":
        return bf16_build(build, lambda k: k.bf16)
    if "AVX2" not in isas_here():
        pytest.skip("needs the AVX2 build: this CPU has no AVX2")
    built = built_for("AVX2", build)
    assert built.bf16
    return built


@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 16, 17, 27, 64, 70])
@pytest.mark.parametrize("inp,out", [(576, 960), (37, 23), (70, 150), (1536, 48)])  # odd inputs, tails of 32
def test_a_product_over_bfloat16_panels_multiplies_the_rounded_rows_and_weight(bf16_kernel, tokens, inp, out):
    kernel = bf16_kernel
    w, x, residual = randn(out, inp, seed=31), randn(tokens, inp, seed=32), randn(tokens, out, seed=33)
    panels = kernel.panels(w, dtype=torch.bfloat16)
    assert panels.shape == (-(-out // kernel.panel), -(-inp // 2), kernel.panel, 2)
    # float32 sums of exact products of bfloat16 operands: close to float64's over the rounded operands
    want = x.bfloat16().double() @ w.bfloat16().double().t()
    tolerance = {"rtol": 1e-5, "atol": 2e-5 * inp ** 0.5}
    torch.testing.assert_close(kernel.product(x, panels, out).double(), want, **tolerance)
    into = residual.clone()
    assert kernel.product(x, panels, out, into) is into
    torch.testing.assert_close(into.double(), residual.double() + want, **tolerance)
    assert (x.bfloat16().double() @ w.double().t() - want).abs().max() > 1e-3  # the weight was rounded


@pytest.mark.parametrize("rows", [9, 16, 35])  # AVX2: in chunks, in twos; 35: widened in fours, three in twos
def test_a_bfloat16_product_row_does_not_depend_on_the_rows_around_it_or_the_threads(bf16_kernel, rows):
    kernel = bf16_kernel
    w, x = randn(3072, 576, seed=34), randn(rows, 576, seed=35)
    panels = kernel.panels_of([w], dtype=torch.bfloat16)[0]
    assert torch.equal(panels, kernel.panels(w, dtype=torch.bfloat16)) and panels.data_ptr() % 64 == 0
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(kernel.product(x, panels, 3072))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    for t in range(rows):  # each row alone, and from a strided view with other columns beside it
        assert torch.equal(kernel.product(x[t:t + 1], panels, 3072), results[0][t:t + 1])
    wide = torch.cat([x, randn(rows, 5, seed=38)], 1)[:, :576]
    assert torch.equal(kernel.product(wide, panels, 3072), results[0])


def test_a_bfloat16_product_rounds_its_rows_as_torch_rounds(bf16_kernel):
    """Ties to even, at every exponent: random bit patterns (every finite normal float32), each row's input
    multiplied by an identity, so the product is the rounded input itself."""
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (3000,), generator=torch.Generator().manual_seed(39), dtype=torch.int64)
    x = torch.cat([bits.to(torch.int32).view(torch.float32), torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -0.0])])
    x = x[x.isfinite() & ((x.abs() >= torch.finfo(torch.float32).tiny) | (x == 0))]
    x = x[x.bfloat16().isfinite()]  # not those that round up past the largest bfloat16
    n = x.numel()
    y = bf16_kernel.product(x[None], bf16_kernel.panels(torch.eye(n), dtype=torch.bfloat16), n)[0]
    assert torch.equal(y, x.bfloat16().float()) and not torch.equal(y, x)


def test_where_they_cannot_run_bfloat16_products_are_refused_by_name(kernel, monkeypatch):
    w = randn(48, 64, seed=36)
    if kernel.bf16:  # what a CPU without the instruction reports
        monkeypatch.setattr(kernel, "bf16", False)
    else:  # and the module's own check, for builds without it
        with pytest.raises(RuntimeError, match="AVX512_BF16"):
            kernel.product(randn(1, 64, seed=37), kernel.panels(w, dtype=torch.bfloat16), 48)
    with pytest.raises(ValueError, match="AVX512_BF16"):
        kernel.panels_of([w], dtype=torch.bfloat16)


def test_many_weights_panels_share_one_allocation_each_on_its_own_line(kernel):
    weights = [randn(out, inp, seed=21 + i) for i, (out, inp) in enumerate([(960, 576), (23, 37), (3072, 576)])]
    together = kernel.panels_of(weights)
    assert len({p.untyped_storage().data_ptr() for p in together}) == 1
    for w, p in zip(weights, together, strict=True):
        assert torch.equal(p, kernel.panels(w)) and p.is_contiguous() and p.data_ptr() % 64 == 0


@pytest.mark.parametrize("rows", [9, 16])
def test_a_product_row_does_not_depend_on_the_rows_around_it_or_the_threads(kernel, rows):
    inp, out = 576, 3072  # large enough to be shared between threads
    w, x = randn(out, inp, seed=14), randn(rows, inp, seed=15)
    panels = kernel.panels(w)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(kernel.product(x, panels, out))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])
    for t in range(rows):  # each row alone, and from a strided view with other columns beside it
        assert torch.equal(kernel.product(x[t:t + 1], panels, out), results[0][t:t + 1])
    wide = torch.cat([x, randn(rows, 5, seed=16)], 1)[:, :inp]
    assert torch.equal(kernel.product(wide, panels, out), results[0])


def test_the_packed_forward_multiplies_over_panels_where_the_kernel_runs(tiny_base):
    forward = PackedLlama(tiny_base.model, 16)
    assert forward.kernel is not None  # float32 on CPU, where this suite builds the kernels
    blk = forward.blocks[0]
    x = randn(3, blk.qkv.t.shape[0], seed=17)
    torch.testing.assert_close(blk.qkv(x), x @ blk.qkv.t, rtol=1e-5, atol=1e-5)
    h = randn(3, blk.o.out, seed=18)
    o = randn(3, blk.o.t.shape[0], seed=19)
    torch.testing.assert_close(blk.o(o, h.clone()), h + o @ blk.o.t, rtol=1e-5, atol=1e-5)
    assert blk.qkv._panels is not None and forward.head._panels is not None
    assert PackedLlama(tiny_base.model, 16, products=False).head._panels is None  # torch's products, no copy


def test_a_packed_forward_given_a_build_multiplies_over_that_build_s_panels(kernel, tiny_base):
    forward = PackedLlama(tiny_base.model, 16, kernel=kernel)  # how the benchmarks compare two builds
    blk = forward.blocks[0]
    assert forward.kernel is kernel and blk.qkv._panels.shape[-1] == kernel.panel
    x = randn(5, blk.qkv.t.shape[0], seed=20)
    torch.testing.assert_close(blk.qkv(x), x @ blk.qkv.t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (5, 64), (3, 37)])
def test_rms_norm_is_llama_s(kernel, tokens, hidden):
    h, w = randn(tokens, hidden, seed=1) * 3, randn(hidden, seed=2)
    want = w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5))
    got = kernel.rms_norm(h, w, 1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' rotary embedding: x * cos + rotate_half(x) * sin, x [tokens, heads, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], -1) * sin[:, None]


def tables(positions: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    angles = torch.outer(torch.arange(positions).float(), 1.0 / 10000 ** (torch.arange(0, head_dim, 2) / head_dim))
    angles = torch.cat([angles, angles], -1)
    sin = angles.sin()
    half = head_dim // 2
    return angles.cos(), sin, torch.cat([-sin[:, :half], sin[:, half:]], -1)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 16), (2, 1, 8)])
def test_rotation_rotates_q_in_place_and_writes_k_and_v_to_their_slots_only(kernel, heads, kv_heads, head_dim):
    max_rows, max_len, tokens = 3, 20, 6
    rows, columns = torch.tensor([0, 0, 0, 2, 1, 2]), torch.tensor([4, 5, 6, 0, 19, 1])
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, seed=3)
    layer = randn(2, max_rows, kv_heads, max_len, head_dim, seed=4)
    before, original = layer.clone(), qkv.clone()
    cos, sin, sin_signed = tables(max_len, head_dim)
    kernel.rotate_and_store(qkv, heads, cos, sin_signed, rows, columns, layer)

    q, k, v = original.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
    shape = (tokens, -1, head_dim)
    torch.testing.assert_close(qkv[:, :heads * head_dim].view(shape), rotated(q.view(shape), cos[columns], sin[columns]))
    assert torch.equal(qkv[:, heads * head_dim:], original[:, heads * head_dim:])  # k and v left as they were
    want = before.clone()
    want[0, rows, :, columns] = rotated(k.view(shape), cos[columns], sin[columns])
    want[1, rows, :, columns] = v.view(shape)
    torch.testing.assert_close(layer, want)
    written = torch.zeros(max_rows, max_len, dtype=torch.bool)
    written[rows, columns] = True
    assert torch.equal(layer[:, ~written[:, None].expand(-1, kv_heads, -1)],
                       before[:, ~written[:, None].expand(-1, kv_heads, -1)])  # nothing else touched


def attention(q: torch.Tensor, layer: torch.Tensor, row: int, n: int, scale: float) -> torch.Tensor:
    """One token's heads [heads, head_dim] over its row's first n keys, by torch's SDPA."""
    keys, values = layer[0, row, :, :n], layer[1, row, :, :n]
    return F.scaled_dot_product_attention(q[None, :, None], keys[None], values[None], scale=scale,
                                          enable_gqa=True)[0, :, 0]


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (4, 4), (4, 1)])
@pytest.mark.parametrize("head_dim", [64, 20, 136])  # eight vectors of eight; two and four floats; 2 x 64 + 8
def test_one_token_rows_attend_their_own_row_s_keys_up_to_their_own(kernel, heads, kv_heads, head_dim):
    max_rows, max_len = 4, 150
    # 10, 1, 150 and 64 keys: under, at and over multiples of the kernel's blocks of 8 and 64 keys
    rows, columns = torch.tensor([3, 0, 1, 2, 0]), torch.tensor([9, 0, 149, 63, 30])
    total, tokens = 5, slice(1, 4)  # the group: tokens 1..3; 0 and 4 belong to others
    qkv = randn(total, (heads + 2 * kv_heads) * head_dim, seed=5)
    query = qkv[:, :heads * head_dim].view(total, heads, head_dim)  # strided: each token's heads side by side
    layer = randn(2, max_rows, kv_heads, max_len, head_dim, seed=6)
    out = torch.full((total, heads, head_dim), 7.0)
    kernel.attend_rows(query, tokens, rows, columns, layer, 0.125, out)
    for t in range(total):
        if tokens.start <= t < tokens.stop:
            want = attention(query[t], layer, int(rows[t]), int(columns[t]) + 1, 0.125)
            torch.testing.assert_close(out[t], want, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(out[t], torch.full((heads, head_dim), 7.0))


@pytest.mark.parametrize("chunk", [2, kvcache.C_CHUNK, kvcache.C_CHUNK + 1])
def test_short_prompt_chunks_attend_in_the_c_loop_as_torch_s_causal_attention(kernel, chunk, monkeypatch):
    """A step of two decoding rows and a prompt chunk 40 tokens deep: a chunk of at most C_CHUNK tokens
    attends in the C loop (each query over its row's keys up to its own: the causal mask), a longer one in
    torch's; either way each query gets what torch's attention gives it."""
    heads, kv_heads, head_dim = 9, 3, 64
    cache = kvcache.SlotCache(kvcache.KVShape(1, kv_heads, head_dim), 3, 64, dtype=torch.float32, device="cpu")
    cache.storage.copy_(randn(*cache.storage.shape, seed=8))
    cache.add(3)
    cache._lengths[:] = [11, 40, 5]
    step = cache.begin_step([1, chunk, 1])
    query = randn(chunk + 2, heads, head_dim, seed=9)
    calls = []
    attend_rows = kernel.attend_rows
    monkeypatch.setattr(kernel, "attend_rows", lambda q, tokens, *a: (calls.append(tokens), attend_rows(q, tokens, *a)))
    got = cache.attend_packed(0, query, 0.125, kernel)
    want = cache.attend_packed(0, query, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    in_c = [t for tokens in calls for t in range(tokens.start, tokens.stop)]
    assert in_c == ([0, *range(1, chunk + 1), chunk + 1] if chunk <= kvcache.C_CHUNK else [0, chunk + 1])
    assert step.columns[1:chunk + 1].tolist() == list(range(40, 40 + chunk))  # the chunk's own positions


def test_long_rows_shared_between_threads_equal_one_thread_bit_for_bit(kernel):
    heads, kv_heads, head_dim, rows_n, max_len = 9, 3, 64, 6, 2000
    rows, columns = torch.arange(rows_n), torch.tensor([1999, 5, 1700, 1000, 64, 1999])  # past the sharing line
    query = randn(rows_n, heads, head_dim, seed=7)
    layer = randn(2, rows_n, kv_heads, max_len, head_dim, seed=8)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = torch.empty(rows_n, heads, head_dim)
            kernel.attend_rows(query, slice(0, rows_n), rows, columns, layer, 0.125, out)
            outs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    torch.testing.assert_close(outs[0][2], attention(query[2], layer, 2, 1701, 0.125), rtol=1e-5, atol=1e-6)
    assert kernel.openmp == torch_on_libgomp()  # so this cannot pass by running on one thread here


def test_the_kernel_refuses_calls_it_cannot_read(kernel):
    with pytest.raises(TypeError, match="rms_norm takes 5 ints and 1 floats \\(2 arguments given\\)"):
        kernel._rms_norm(1, 2)
    with pytest.raises(TypeError):
        kernel._rms_norm(1, 2, 3, 4, 5, "eps")


def test_without_the_kernel_the_packed_forward_keeps_torch_s_operators_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(forward_kernel._kernel, "_built", [])  # as in a fresh process
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("RAHF_SERVE_CACHE", "/nonexistent-cache")  # nothing cached to fall back on
    with caplog.at_level("WARNING", logger="rahf_serve.forward_kernel"):
        assert forward_kernel.forward_kernel() is None
        assert forward_kernel.forward_kernel() is None
    assert caplog.text.count("forward kernel unavailable") == 1 and "no-such-cc" in caplog.text
    monkeypatch.setattr(forward_kernel._kernel, "_built", [])
    monkeypatch.delenv("CC")
    monkeypatch.setenv("RAHF_FORWARD_KERNEL", "0")
    assert forward_kernel.forward_kernel() is None


def test_a_long_attention_call_lets_the_server_s_other_threads_run(kernel):
    heads, kv_heads, head_dim, rows_n, max_len = 9, 3, 64, 32, 8000  # tens of ms
    rows, columns = torch.arange(rows_n), torch.full((rows_n,), max_len - 1)
    query, layer = randn(rows_n, heads, head_dim, seed=9), randn(2, rows_n, kv_heads, max_len, head_dim, seed=10)
    out = torch.empty(rows_n, heads, head_dim)
    assert lets_other_threads_run(lambda: kernel.attend_rows(query, slice(0, rows_n), rows, columns, layer, 0.125,
                                                             out))
