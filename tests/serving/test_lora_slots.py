"""LoraSlots against plain PEFT, one row at a time: mixed batches, blends, many resident adapters, LRU."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from rahf_serve.blend import blend_key, build_blend
from rahf_serve.bundle import CONFIG_FILE, WEIGHTS_FILE, peft_payload, read_bundle, write_bundle
from rahf_serve.errors import BundleError, FingerprintMismatch, LimitExceeded, RahfError
from rahf_serve.lora_slots import LoraSlots, LoraWeights, SlotLinear, SlotsExhausted, blend_lora, read_lora
from rahf_serve.models import BaseModel, load_base
from tests.helpers import random_lora_bundle

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MIX = [("kind", 0.7), ("wide", -0.4)]


def lora_bundle(base: BaseModel, out: Path, seed: int, **lora: object) -> Path:
    """A random LoRA bundle with any LoraConfig settings (rank/alpha patterns, rsLoRA, DoRA)."""
    torch.manual_seed(seed)
    config = LoraConfig(init_lora_weights=False, base_model_name_or_path=base.hub_id, **lora)  # type: ignore[arg-type]
    adapter_config, state = peft_payload(get_peft_model(copy.deepcopy(base.model), config))
    return write_bundle(out, adapter_config=adapter_config, lora_state=state, vectors=None, manifest=None)


@pytest.fixture(scope="module")
def tiny(lively_model_dir, tmp_path_factory) -> tuple[BaseModel, dict[str, Path]]:
    base = load_base(str(lively_model_dir), device="cpu", dtype="float32")
    root = tmp_path_factory.mktemp("slot-adapters")
    bundles = {
        "kind": random_lora_bundle(base, root / "kind", seed=1, r=4, dropout=0.05),
        "wide": lora_bundle(base, root / "wide", seed=2, r=4, lora_alpha=6, target_modules=list(ALL),
                            rank_pattern={"q_proj": 6}, alpha_pattern={"down_proj": 3}, use_rslora=True),
    }
    return base, bundles


def peft_per_row(plain: torch.nn.Module, bundles: dict[str, Path], ids: torch.Tensor,
                 names: list[str | None]) -> torch.Tensor:
    """Reference: PEFT with the bundles (and the blend MIX as "mix"), one row and one set_adapter at a time."""
    model = None
    for name, path in bundles.items():
        if model is None:
            model = PeftModel.from_pretrained(copy.deepcopy(plain), str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    assert model is not None
    build_blend(model, blend_key(MIX), "mix")
    model.eval()
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name is None:
                with model.disable_adapter():
                    rows.append(model(ids[i:i + 1]).logits)
            else:
                model.set_adapter(name)
                rows.append(model(ids[i:i + 1]).logits)
    return torch.cat(rows)


def slot_rows(slots: LoraSlots, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    slots.set_rows([None if n is None else slots.slot_of(n) for n in names])
    with torch.no_grad():
        return slots.model(ids).logits


def load_all(slots: LoraSlots, bundles: dict[str, Path]) -> dict[str, LoraWeights]:
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    for name, w in weights.items():
        slots.load_weights(name, w)
    slots.load_weights("mix", blend_lora([(weights[n], w) for n, w in MIX]))
    return weights


def ids_for(model: torch.nn.Module, rows: int, length: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (rows, length), generator=g)


# One-token rows of packed steps: through the C row kernel, and through torch's batched matmuls (GPUs, or
# no compiler).
KERNEL = pytest.mark.parametrize("kernel", [True, False], ids=["c-kernel", "torch"])

LAYOUTS = {
    "mixed": [None, "kind", "wide", None, "mix", "kind"],
    "one-adapter-and-base": [None, "kind", None],
    "one-adapter": ["wide", "wide"],
    "base-only": [None, None],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_rows_match_peft_one_row_at_a_time(tiny, layout):
    base, bundles = tiny
    plain = copy.deepcopy(base.model).eval()
    names = LAYOUTS[layout]
    ids = ids_for(plain, len(names))
    want = peft_per_row(plain, bundles, ids, names)
    slots = LoraSlots(copy.deepcopy(plain), max_loras=4, max_rank=16)
    load_all(slots, bundles)
    got = slot_rows(slots, ids, names)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        unchanged = plain(ids).logits
    for i, name in enumerate(names):  # each adapter really changes its rows, base rows stay the base
        assert (name is None) == torch.allclose(got[i], unchanged[i], atol=1e-5)


def assert_packed_equals_each_row_alone(slots: LoraSlots, rows: list[int | None], tokens: list[int]) -> None:
    """In every wrapped module, a packed step over `rows` (row i owning tokens[i] positions) gives each
    row's tokens what that row alone gives."""
    starts = [sum(tokens[:i]) for i in range(len(tokens))]
    g = torch.Generator().manual_seed(3)
    for module in slots._wrapped.values():
        x = torch.randn(1, sum(tokens), module.in_features, generator=g)
        with torch.no_grad():
            slots.set_rows(rows, tokens)
            packed = module(x)
            for slot, start, n in zip(rows, starts, tokens, strict=True):
                slots.set_rows([slot])
                torch.testing.assert_close(packed[:, start:start + n], module(x[:, start:start + n]),
                                           atol=1e-5, rtol=1e-5)
                assert slots.active == (slot is not None)


@KERNEL
@pytest.mark.parametrize("decode_first", [False, True], ids=["interleaved", "decoding-rows-first"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_rows_equal_each_row_alone(tiny, layout, decode_first, kernel):
    """A packed step ([1, total], row i owning tokens[i] positions: one for a decoding row, a chunk for a
    prompt) gives every token what its own row alone gives, in every wrapped module, whether the
    decoding rows are interleaved with prompt chunks or come first (the engine's order, read in place)."""
    base, bundles = tiny
    slots = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=4, max_rank=16, kernel=kernel)
    load_all(slots, bundles)
    names = LAYOUTS[layout]
    tokens = [1 if i % 2 else 3 + i for i in range(len(names))]
    if decode_first:
        tokens = sorted(tokens)
    assert_packed_equals_each_row_alone(slots, [None if n is None else slots.slot_of(n) for n in names], tokens)
    slots.clear_rows()
    assert not slots.active


@pytest.mark.parametrize("layout", [[0, 1, 2, 3], [2, 0, 3, 1], [0, 0, 2, None, 2, 1], [0, 7], [7, 0, 0],
                                    [3, 0, 3, 3, None, 3, 1, 3, 3]],
                         ids=["in-slot-order", "shuffled", "shared-slots-and-a-gap", "spread", "spread-shared",
                              "six-on-one-slot-among-others"])
@pytest.mark.parametrize("decode_first", [True, False], ids=["decoding-rows-first", "after-a-prompt"])
@KERNEL
def test_one_token_rows_on_many_slots_equal_each_row_alone(tiny, layout, decode_first, kernel):
    """One-token rows on several slots (in order, shuffled, shared, with an unused slot between, spread
    out): every token gets what its row alone gets, in every wrapped module, from the C kernel (which gets
    the rows of one slot side by side, to read its factors once for them) and from torch's products
    (factors read in place as a band when the slots lie close together, else gathered)."""
    base, bundles = tiny
    slots = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=8, max_rank=16, kernel=kernel)
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    for i in range(8):
        slots.load_weights(f"a{i}", blend_lora([(weights["wide" if i % 2 else "kind"], 1.0 + i / 8)]))
    rows = [None if s is None else slots.slot_of(f"a{s}") for s in layout]
    tokens = [1] * len(rows)
    if not decode_first:  # a prompt chunk first: the one-token rows are not the first positions
        rows, tokens = [slots.slot_of("a5"), *rows], [3, *tokens]
    assert_packed_equals_each_row_alone(slots, rows, tokens)
    slots.set_rows(rows, tokens)
    plans = [m.rows for m in slots._wrapped.values()]
    assert all((p.kernel is not None) == kernel and (p.band is None and p.gather is None) == kernel for p in plans)
    if kernel:
        assert all(p.kernel._slots.tolist() == sorted(p.kernel._slots.tolist()) for p in plans)


def rounded(weights: LoraWeights) -> LoraWeights:
    """What bfloat16 slots hold of `weights` (the scaling already folded into B), as float32."""
    return LoraWeights({m: (a.bfloat16().float(), b.bfloat16().float()) for m, (a, b) in weights.modules.items()})


@KERNEL
def test_bfloat16_factors_are_the_adapters_rounded_at_half_the_memory(tiny, kernel):
    """--lora-dtype bfloat16 under a float32 model: in every wrapped module, decoding rows and prompt
    chunks of every kind of row get what float32 slots holding the same factors rounded to bfloat16 give
    (widening is exact; only the order of the sums may differ), packed rows still equal each row alone,
    and the slot tensors take half the bytes."""
    base, bundles = tiny
    half = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=4, max_rank=16, kernel=kernel, dtype=torch.bfloat16)
    full = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=4, max_rank=16, kernel=kernel)
    weights = load_all(half, bundles)
    for name, w in weights.items():
        full.load_weights(name, rounded(w))
    full.load_weights("mix", rounded(blend_lora([(weights[n], w) for n, w in MIX])))
    names = LAYOUTS["mixed"]
    rows, tokens = [None if n is None else half.slot_of(n) for n in names], [1, 1, 5, 1, 1, 4]
    assert rows == [None if n is None else full.slot_of(n) for n in names]
    g = torch.Generator().manual_seed(4)
    for path, module in half._wrapped.items():
        assert module.slot_A.dtype == torch.bfloat16
        assert 2 * module.slot_A.nbytes == full._wrapped[path].slot_A.nbytes
        x = torch.randn(1, sum(tokens), module.in_features, generator=g)
        with torch.no_grad():
            half.set_rows(rows, tokens)
            full.set_rows(rows, tokens)
            torch.testing.assert_close(module(x), full._wrapped[path](x), atol=1e-5, rtol=1e-5)
    assert_packed_equals_each_row_alone(half, rows, tokens)


def test_with_bfloat16_dot_products_every_lora_token_goes_through_the_kernel(tiny):
    """bfloat16 products (`matmul_dtype`) over bfloat16 factors: the kernel does every LoRA token, a prompt
    chunk's too, so a token gets bit for bit the same in a chunk as a one-token row (torch's float32
    products would round otherwise), near what float32 arithmetic on the same factors gives."""
    base, bundles = tiny
    dots = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=4, max_rank=16, dtype=torch.bfloat16,
                     matmul_dtype=torch.bfloat16)
    if not dots.bf16_dots:
        pytest.skip("needs AVX512_BF16 and the kernel's AVX-512 build")
    widened = LoraSlots(copy.deepcopy(base.model).eval(), max_loras=4, max_rank=16, dtype=torch.bfloat16)
    for slots in (dots, widened):
        load_all(slots, bundles)
    names = LAYOUTS["mixed"]
    rows, tokens = [None if n is None else dots.slot_of(n) for n in names], [1, 1, 5, 1, 1, 4]
    one_by_one = [slot for slot, n in zip(rows, tokens, strict=True) for _ in range(n)]
    g = torch.Generator().manual_seed(5)
    for path, module in dots._wrapped.items():
        x = torch.randn(1, sum(tokens), module.in_features, generator=g)
        with torch.no_grad():
            dots.set_rows(rows, tokens)
            assert module.rows.segments == [] and module.rows.kernel is not None
            chunked = module(x)
            dots.set_rows(one_by_one, [1] * len(one_by_one))
            assert torch.equal(chunked, module(x))
            widened.set_rows(rows, tokens)
            float32 = widened._wrapped[path](x)
        torch.testing.assert_close(chunked, float32, atol=0.02, rtol=0.02)
        assert not torch.equal(chunked, float32)


def test_bfloat16_dot_products_are_for_bfloat16_factors(tiny):
    base, bundles = tiny
    slots = LoraSlots(copy.deepcopy(base.model).eval(), max_rank=16, matmul_dtype=torch.bfloat16)
    load_all(slots, bundles)
    assert slots.dtype == torch.float32 and not slots.bf16_dots  # float32 factors: float32 arithmetic
    assert slots._wrapped and all(m._factors_struct.dtype == 0 for m in slots._wrapped.values())
    with pytest.raises(RahfError, match="float32 or bfloat16, not torch.float16"):
        LoraSlots(copy.deepcopy(base.model).eval(), matmul_dtype=torch.float16)


def test_sixty_four_resident_adapters_give_the_same_logits_as_one(tiny):
    base, bundles = tiny
    model = copy.deepcopy(base.model).eval()
    ids = ids_for(model, 6)
    one = ["kind", None, "kind", "kind", None, "kind"]
    mixed = LAYOUTS["mixed"]

    few = LoraSlots(model, max_loras=3, max_rank=16)
    load_all(few, bundles)
    want_one, want_mixed = slot_rows(few, ids, one), slot_rows(few, ids, mixed)
    few.unwrap()

    many = LoraSlots(model, max_loras=64, max_rank=16)
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    for i in range(61):  # fillers first, so the three served ones land in the last slots
        many.load_weights(f"filler-{i}", blend_lora([(weights["wide" if i % 2 else "kind"], 1.0 + i / 64)]))
    load_all(many, bundles)
    assert len(many.resident) == 64 and many.slot_of("mix") == 63
    assert torch.equal(slot_rows(many, ids, one), want_one)
    assert torch.equal(slot_rows(many, ids, mixed), want_mixed)


def test_lru_evicts_the_least_recently_used_unpinned_and_reloads_exactly(tiny):
    base, bundles = tiny
    model = copy.deepcopy(base.model).eval()
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    weights["mix"] = blend_lora([(weights[n], w) for n, w in MIX])
    loads: list[str] = []

    def loader(name: str) -> LoraWeights:
        loads.append(name)
        return weights[name]

    slots = LoraSlots(model, max_loras=2, max_rank=16, loader=loader)
    ids = ids_for(model, 2)
    slots.ensure("kind")
    slots.ensure("wide")
    before = slot_rows(slots, ids, ["wide", None])
    slots.ensure("kind")  # now "wide" is the least recently used
    slots.ensure("mix")
    assert slots.resident == ["kind", "mix"]

    slots.ensure("mix", pin=True)
    slots.ensure("kind")  # "mix" is now least recently used, but pinned: "kind" must go instead
    slots.ensure("wide")
    assert set(slots.resident) == {"mix", "wide"}
    assert loads == ["kind", "wide", "mix", "wide"]
    assert torch.equal(slot_rows(slots, ids, ["wide", None]), before)

    slots.pin("wide")
    with pytest.raises(SlotsExhausted, match="--max-loras"):
        slots.ensure("kind")
    with pytest.raises(Exception, match="running row"):
        slots.unload("wide")
    slots.unpin("wide")
    slots.unload("wide")
    assert slots.resident == ["mix"]


def test_refusals_name_the_problem_and_leave_the_slots_alone(tiny, tmp_path):
    base, bundles = tiny
    model = copy.deepcopy(base.model).eval()
    slots = LoraSlots(model, max_loras=4, max_rank=4)
    kind = read_lora(read_bundle(bundles["kind"]), "kind")
    slots.load_weights("kind", kind)
    with pytest.raises(LimitExceeded, match="--max-lora-rank 4"):
        slots.load_weights("wide", read_lora(read_bundle(bundles["wide"]), "wide"))
    with pytest.raises(LimitExceeded, match="sum of its adapters' ranks"):
        slots.load_weights("twice", blend_lora([(kind, 1.0), (kind, 0.5)]))
    # read_bundle already refuses DoRA's extra tensors; the config check stands on its own as well.
    dora = lora_bundle(base, tmp_path / "dora", seed=5, r=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(BundleError, match="DoRA"):
        slots.load("dora", load_file(dora / WEIGHTS_FILE), json.loads((dora / CONFIG_FILE).read_text()))
    config = dict(read_bundle(bundles["kind"]).adapter_config, alora_invocation_tokens=[1, 2])
    with pytest.raises(BundleError, match="alora_invocation_tokens"):
        slots.load("alora", {}, config)
    a, b = kind.modules["model.layers.0.self_attn.q_proj"]
    for path in ("model.layers.9.self_attn.q_proj", "model.embed_tokens"):
        with pytest.raises(FingerprintMismatch, match=path):
            slots.load_weights("odd", LoraWeights({path: (a, b)}))
    with pytest.raises(FingerprintMismatch, match="do not fit"):
        slots.load_weights("odd", LoraWeights({"model.layers.0.mlp.down_proj": (a, b)}))
    assert slots.resident == ["kind"]
    assert not any(isinstance(m, SlotLinear) for n, m in model.named_modules() if "mlp" in n)


def test_unwrap_restores_bit_identical_base_outputs(tiny):
    base, bundles = tiny
    model = copy.deepcopy(base.model).eval()
    originals = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    ids = ids_for(model, 3)
    with torch.no_grad():
        want = model(ids).logits
    slots = LoraSlots(model, max_loras=4, max_rank=16)
    load_all(slots, bundles)
    assert torch.equal(slot_rows(slots, ids, [None, None, None]), want)  # base rows skip the LoRA path
    assert not torch.equal(slot_rows(slots, ids, ["kind", None, "mix"]), want)
    assert slots.unwrap() is model
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == originals


def test_slot_tensors_are_allocated_once(tiny):
    base, bundles = tiny
    model = copy.deepcopy(base.model).eval()
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    slots = LoraSlots(model, max_loras=2, max_rank=16, targets=ALL, loader=weights.__getitem__)
    wrapped = [m for m in model.modules() if isinstance(m, SlotLinear)]
    assert len(wrapped) == 7 * model.config.num_hidden_layers
    ptrs = [(m.slot_A.data_ptr(), m.slot_B.data_ptr()) for m in wrapped]
    ids = ids_for(model, 2)
    slots.ensure("kind")
    fresh = slot_rows(slots, ids, ["kind", None])
    slots.ensure("wide")
    slots.unload("kind")
    slots.load_weights("mix", blend_lora([(weights["kind"], 0.5)]))
    slots.ensure("kind")  # evicts "wide"
    assert slots.resident == ["mix", "kind"]
    # "kind" now sits where "wide" (higher rank, every module) was: nothing of "wide" may be left there.
    assert torch.equal(slot_rows(slots, ids, ["kind", None]), fresh)
    assert [(m.slot_A.data_ptr(), m.slot_B.data_ptr()) for m in wrapped] == ptrs


def test_a_row_reads_no_factors_in_modules_its_adapter_leaves_alone(tiny):
    """"kind" has weights in q/v only, "wide" in every Linear: in k_proj a "kind" row is a base row (only
    "wide"'s factors are read, in place), in q_proj both are gathered; the logits stay PEFT's. Loading or
    unloading an adapter regroups the modules and plans the rows already set again."""
    base, bundles = tiny
    plain = copy.deepcopy(base.model).eval()
    ids = ids_for(plain, 3)
    names = ["kind", "wide", None]
    want = peft_per_row(plain, bundles, ids, names)
    slots = LoraSlots(copy.deepcopy(plain), max_loras=4, max_rank=16)
    weights = {name: read_lora(read_bundle(path), name) for name, path in bundles.items()}
    slots.load_weights("kind", weights["kind"])
    slots.set_rows([slots.slot_of("kind"), None, None])
    slots.load_weights("wide", weights["wide"])  # after set_rows: the new groups are planned too
    with torch.no_grad():
        assert torch.equal(slots.model(ids).logits[0], slot_rows(slots, ids, ["kind", None, None])[0])
    got = slot_rows(slots, ids, names)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    layer = "model.layers.1.self_attn."
    q, k = slots._wrapped[layer + "q_proj"], slots._wrapped[layer + "k_proj"]
    assert q.rows.single is None and q.rows.index.tolist() == [slots.slot_of("kind"), slots.slot_of("wide"), 4]
    assert k.rows.single == slots.slot_of("wide") and k.rows.mask.flatten().tolist() == [0.0, 1.0, 0.0]

    slots.unload("wide")  # the rows stay set: "wide"'s row is now a base row everywhere
    assert k.rows.index is None and q.rows.single == slots.slot_of("kind")
    with torch.no_grad():
        alone = slots.model(ids).logits
    torch.testing.assert_close(alone, peft_per_row(plain, bundles, ids, ["kind", None, None]), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_shipped_bundles_match_peft_on_the_real_model(real_base):
    root = Path(__file__).resolve().parents[2] / "adapters"
    bundles = {"kind": root / "smollm2-135m-rahf-dual", "wide": root / "smollm2-135m-rahf-scit"}
    assert read_bundle(bundles["kind"]).adapter_config["lora_dropout"] > 0  # eval mode must not drop
    plain = real_base.model.eval()
    names = [None, "kind", "wide", "mix", None, "kind"]
    ids = ids_for(plain, len(names), length=8)
    want = peft_per_row(plain, bundles, ids, names)
    slots = LoraSlots(copy.deepcopy(plain), max_loras=4, max_rank=32)
    load_all(slots, bundles)
    torch.testing.assert_close(slot_rows(slots, ids, names), want, atol=1e-4, rtol=1e-4)
