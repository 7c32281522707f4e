"""The engine's own llama forward: the same tokens and log-probabilities as transformers' forward in the
same engine, for every kind of row at once; the model it fuses stays the same model for everyone else."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rahf_serve import forward_kernel, lora_kernel
from rahf_serve.bundle import WEIGHTS_FILE
from rahf_serve.engine import Engine
from rahf_serve.errors import BundleError, RahfError
from rahf_serve.forward_kernel import ForwardKernel
from rahf_serve.lora_slots import SlotSite
from rahf_serve.models import load_base
from rahf_serve.packed_llama import unsupported_reason
from rahf_serve.registry import AdapterRegistry
from rahf_serve.request import GenerationRequest, SteeringSpec, StreamEvent
from rahf_serve.sampling import SamplingParams
from tests.conftest import build_tiny_model_dir
from tests.helpers import random_lora_bundle
from tests.serving.conftest import burst, load_lively

ALL_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, lively_model_dir) -> Path:
    base = load_lively(lively_model_dir)
    root = tmp_path_factory.mktemp("packed-bundles")
    random_lora_bundle(base, root / "every", seed=5, r=4, targets=ALL_LINEARS)  # the shipped Dual's shape
    random_lora_bundle(base, root / "qv", seed=6, r=2)
    return root


def served(model_dir: Path, bundles: Path, packed: bool, lora_dtype: torch.dtype | None = None,
           matmul_dtype: torch.dtype = torch.float32) -> Iterator[Engine]:
    # A small token budget: the long prompt is fed in chunks beside decoding rows.
    engine = Engine(load_lively(model_dir), max_batch=8, max_new_tokens=64, max_num_batched_tokens=48,
                    packed_forward=packed, lora_dtype=lora_dtype, matmul_dtype=matmul_dtype)
    AdapterRegistry(engine, bundles).load_dir()
    with engine:
        yield engine


@pytest.fixture(scope="module")
def engines(lively_model_dir, bundles) -> Iterator[tuple[Engine, Engine]]:
    packed, plain = served(lively_model_dir, bundles, True), served(lively_model_dir, bundles, False)
    yield next(packed), next(plain)
    for gen in (packed, plain):
        next(gen, None)


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(100, 40_000, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def batch_of_every_kind() -> list[GenerationRequest]:
    greedy = SamplingParams(max_tokens=12, temperature=0.0)
    return [
        GenerationRequest(prompt(5, 1), greedy, logprobs=2),
        GenerationRequest(prompt(9, 2), greedy, "every", logprobs=2),
        GenerationRequest(prompt(7, 3), greedy, "qv", steering=SteeringSpec("every", 2.0), logprobs=2),
        GenerationRequest(prompt(6, 4), greedy, blend=(("every", 0.5), ("qv", 1.5)), logprobs=2),
        GenerationRequest(prompt(130, 5), greedy, "every", prompt_logprobs=1, logprobs=2),  # chunked prefill
        GenerationRequest(prompt(4, 6), SamplingParams(max_tokens=12, temperature=0.9, seed=7), "qv"),
    ]


def run_together(engine: Engine, reqs: list[GenerationRequest]) -> list[list[StreamEvent]]:
    """Submit `reqs` as one group; each request's events."""
    _, log = burst(engine, reqs)
    return [[e for j, e in log if j == i] for i in range(len(reqs))]


def assert_same_streams(got: list[list[StreamEvent]], want: list[list[StreamEvent]], within: float = 1e-4) -> None:
    """Each request's tokens equal, its sampled tokens' log-probabilities within `within`."""
    for g, w in zip(got, want, strict=True):
        assert [t for e in g for t in e.token_ids] == [t for e in w for t in e.token_ids]
        g_lp = [x.logprob for e in g for x in (e.logprobs or [])]
        assert g_lp == pytest.approx([x.logprob for e in w for x in (e.logprobs or [])], abs=within)


def test_the_packed_forward_serves_exactly_what_transformers_forward_serves(engines):
    packed, plain = engines
    assert (packed.forward_impl, plain.forward_impl) == ("packed-llama", "transformers")
    assert packed._packed.kernel is not None  # the C operators: norms, rotation and cache write, decode attention
    reqs = batch_of_every_kind()
    got, want = run_together(packed, reqs), run_together(plain, reqs)
    assert_same_streams(got, want)
    for g, w in zip(got, want, strict=True):
        g_prompt, w_prompt = g[0].prompt_logprobs, w[0].prompt_logprobs
        assert (g_prompt is None) == (w_prompt is None)
        if g_prompt is not None:
            assert [x.logprob for x in g_prompt[1:]] == pytest.approx([x.logprob for x in w_prompt[1:]], abs=1e-4)


@pytest.mark.parametrize("products", ["c", "torch"])
def test_every_site_is_handed_the_rows_the_kernel_reads_unchecked(engines, lively_model_dir, bundles, monkeypatch,
                                                                  products):
    """The kernel reads a site's input as [total, in] float32 and adds into its output as [total, width],
    each with its rows back to back, and nothing on the hot path checks it: every step the forward runs
    (decode-only, prompt chunks beside decoding rows, every kind of row) must hand them so, whether the
    product's C call adds the rows (the C products: every step) or the site's own call does (products
    through torch, where the forward kernel cannot be built)."""
    gen = None
    if products == "c":
        engine = engines[0]
    else:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(forward_kernel._kernel, "_built", [None])
            gen = served(lively_model_dir, bundles, True)
            engine = next(gen)
    seen, add, product_then = [], SlotSite.add, ForwardKernel.product_then
    sites = {}

    def layout(x: torch.Tensor, out: torch.Tensor, total: int, site: SlotSite) -> tuple[bool, ...]:
        return (x.is_contiguous(), out.is_contiguous(), x.dtype == out.dtype == torch.float32,
                tuple(x.shape) == (total, site._struct.ldx), tuple(out.shape) == (total, site._struct.ldy))

    def checked(site: SlotSite, x: torch.Tensor, out: torch.Tensor, total: int) -> None:
        seen.append(("site", *layout(x, out, total, site)))
        add(site, x, out, total)

    def checked_product(kernel, x, panels, out_features, into, call):
        y, done = product_then(kernel, x, panels, out_features, into, call)
        if call[1] and done:
            seen.append(("product", *layout(x, y, x.shape[0], sites[call[1]])))
        return y, done

    monkeypatch.setattr(SlotSite, "add", checked)
    monkeypatch.setattr(ForwardKernel, "product_then", checked_product)
    for blk in engine._packed.blocks:
        sites.update({site._address: site for site in blk.sites() if site is not None})
    try:
        run_together(engine, batch_of_every_kind())
    finally:
        if gen is not None:
            next(gen, None)
    by = "product" if products == "c" else "site"
    assert sum(b == by for b, *_ in seen) > 100 and all(b == by for b, *_ in seen)
    assert [s for s in seen if not all(s[1:])] == []


@pytest.mark.parametrize("missing", [("row",), ("forward",), ("row", "forward")])
def test_without_the_c_kernels_the_packed_forward_serves_the_same(engines, lively_model_dir, bundles, missing):
    """Where a C kernel cannot be built (or on a GPU), torch does its part: one-token LoRA rows go through
    torch's batched matmuls on column slices of the fused q/k/v and gate/up products, and the norms, rotation,
    cache write and attention through torch's operators: the same tokens as with the kernels."""
    _, plain = engines
    with pytest.MonkeyPatch.context() as mp:
        for name in missing:  # as where it cannot be built
            mp.setattr({"row": lora_kernel, "forward": forward_kernel}[name]._kernel, "_built", [None])
        gen = served(lively_model_dir, bundles, True)
        engine = next(gen)
    try:
        assert (engine._slots.kernel is None) == ("row" in missing)
        assert (engine._packed.kernel is None) == ("forward" in missing)
        reqs = batch_of_every_kind()
        assert_same_streams(run_together(engine, reqs), run_together(plain, reqs))
    finally:
        next(gen, None)


def test_bfloat16_factors_serve_the_same_through_the_kernel_and_torch(lively_model_dir, bundles):
    """--lora-dtype bfloat16: the kernel reads the factors as stored, torch's products (prompt chunks, and
    every row where there is no kernel) take them widened; every kind of row gets the same tokens both ways."""
    with_kernel = served(lively_model_dir, bundles, True, torch.bfloat16)
    engines = [next(with_kernel)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lora_kernel._kernel, "_built", [None])
        without = served(lively_model_dir, bundles, True, torch.bfloat16)
        engines.append(next(without))
    try:
        assert [e._slots.kernel is not None for e in engines] == [True, False]
        assert {m.slot_A.dtype for e in engines for m in e._slots._wrapped.values()} == {torch.bfloat16}
        reqs = batch_of_every_kind()
        assert_same_streams(run_together(engines[0], reqs), run_together(engines[1], reqs))
    finally:
        for gen in (with_kernel, without):
            next(gen, None)


def test_bfloat16_products_serve_each_row_as_alone_and_near_float32(lively_model_dir, bundles):
    """--matmul-dtype bfloat16: the products multiply a bfloat16 copy of the weights by bfloat16-rounded rows,
    and adapter rows their bfloat16 factors in bfloat16 dot products likewise, one row's arithmetic
    independent of the others', so every kind of row gets the same tokens batched as
    alone here. Its log-probabilities stay near float32's, and near each other's: rounding to bfloat16 turns
    the float32 rounding between two ways of computing a prompt (other chunks, keys another request computed)
    into differences of about 1e-2 (float32: 1e-5), which can flip a greedy near-tie on other prompts."""
    kernel = forward_kernel.forward_kernel()
    if kernel is None or not kernel.bf16:
        pytest.skip("needs the kernel's AVX2 build or AVX512_BF16 (the refusal elsewhere is tested without them)")
    halved, plain = served(lively_model_dir, bundles, True, matmul_dtype=torch.bfloat16), served(
        lively_model_dir, bundles, True)
    engine, float32 = next(halved), next(plain)
    try:
        assert engine._packed.head._panels.dtype == torch.bfloat16
        # the adapter rows' products too, where the row kernel has bfloat16 dot products (else it widens the
        # bfloat16 factors into float32 arithmetic)
        assert engine._slots.dtype == torch.bfloat16 and engine._slots.bf16_dots == engine._slots.kernel.bf16_dots
        reqs = batch_of_every_kind()
        together = run_together(engine, reqs)
        # within 0.05 with AVX512_BF16's dot products; 0.051 once with AVX2's and the factors widened
        assert_same_streams(together, [run_together(engine, [r])[0] for r in reqs], within=0.1)
        first = [g[0].logprobs[0].logprob for g in together[:5]]
        want = [w[0].logprobs[0].logprob for w in run_together(float32, reqs[:5])]
        # within 0.11 of float32's on this model (its weights drawn fifteen times wider than a real model's),
        # 0.06 with the adapter rows' products in float32
        assert first == pytest.approx(want, abs=0.15) and first != want
    finally:
        for gen in (halved, plain):
            next(gen, None)


def test_bfloat16_products_are_refused_where_they_cannot_run(lively_model_dir):
    base = load_lively(lively_model_dir)
    with pytest.raises(RahfError, match="packed forward"):
        Engine(base, max_batch=2, packed_forward=False, matmul_dtype=torch.bfloat16)
    bf16_model = load_base(str(lively_model_dir), device="cpu", dtype="bfloat16")
    with pytest.raises(RahfError, match="float32 models on CPU only"):
        Engine(bf16_model, max_batch=2, matmul_dtype=torch.bfloat16)


def test_modules_wrapped_after_steps_ran_are_used(lively_model_dir, bundles):
    """The forward keeps each block's LoRA modules between steps; an adapter loaded later that wraps
    more of them (q/v first, then every Linear) is served exactly as by transformers' forward."""
    reqs = [GenerationRequest(prompt(6, 11), SamplingParams(max_tokens=6, temperature=0.0), name)
            for name in ("qv", "every")]
    outputs = []
    for packed in (True, False):
        engine = Engine(load_lively(lively_model_dir), max_batch=4, max_new_tokens=16, packed_forward=packed)
        registry = AdapterRegistry(engine, bundles)
        with engine:
            registry.load("qv", str(bundles / "qv"))
            first = run_together(engine, reqs[:1])
            assert not any(hasattr(m, "slot_A") for n, m in engine.model.named_modules() if n.endswith("o_proj"))
            registry.load("every", str(bundles / "every"))
            outputs.append((first, run_together(engine, reqs)))
    (first, both), (want_first, want_both) = outputs
    tokens = lambda runs: [[t for e in run for t in e.token_ids] for run in runs]  # noqa: E731
    assert tokens(first) == tokens(want_first) and tokens(both) == tokens(want_both)
    assert tokens(both)[0] == tokens(first)[0]


def test_fused_weights_leave_the_model_the_same_for_other_callers(lively_model_dir, bundles):
    fresh = load_lively(lively_model_dir).model
    ids = torch.tensor([prompt(12, 9)])
    with torch.inference_mode():
        want = fresh(input_ids=ids).logits
    engine = next(served(lively_model_dir, bundles, True))
    attn = engine.model.model.layers[0].self_attn
    q, k = attn.q_proj.weight, attn.k_proj.weight
    assert k.data_ptr() == q.data_ptr() + q.numel() * q.element_size()  # views of one q/k/v matrix
    with torch.inference_mode():
        got = engine.model(input_ids=ids).logits
    engine.stop()
    assert torch.allclose(got, want, atol=1e-5)


def test_bases_it_does_not_cover_keep_transformers_forward(tmp_path, tokenizer):
    biased = build_tiny_model_dir(tmp_path / "biased", tokenizer, attention_bias=True)
    base = load_base(str(biased), device="cpu", dtype="float32")
    assert unsupported_reason(base.model) == "Linear biases"
    with Engine(base, max_batch=2, max_new_tokens=8) as engine:
        assert engine.forward_impl == "transformers"
        assert engine.generate(GenerationRequest(prompt(5, 1), SamplingParams(max_tokens=3, temperature=0))
                               ).completion_tokens == 3


def test_an_adapter_on_the_output_head_is_refused_when_it_loads(lively_model_dir, tmp_path):
    """The head sees only the rows that keep logits, not every token of the step the row plans hold: an
    adapter with weights there is refused by name rather than failing every generation that uses it."""
    bundle = random_lora_bundle(load_lively(lively_model_dir), tmp_path / "head", seed=8, r=2,
                                targets=("q_proj", "lm_head"))
    weights = bundle / WEIGHTS_FILE  # PEFT also saved the head's tied base weight, which bundles refuse
    save_file({k: v for k, v in load_file(weights).items() if "lora_" in k}, weights)
    for packed in (True, False):
        engine = Engine(load_lively(lively_model_dir), max_batch=2, max_new_tokens=16, packed_forward=packed)
        with engine, pytest.raises(BundleError, match="output head \\(lm_head\\)"):
            AdapterRegistry(engine, tmp_path).load("head", str(bundle))
