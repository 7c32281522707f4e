"""The slot KV cache against the reference: each prompt decoded alone with transformers' DynamicCache.

A small scheduler below drives the cache the way an engine does (rows join, feed prompt chunks or one
token, leave when done) and every row's greedy tokens and logits must match that row decoded alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    Gemma2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from rahf_serve.kvcache import (
    ContextFull,
    KVShape,
    SlotCache,
    SlotsFull,
    UnsupportedModelError,
    check_supported,
    kv_cache_bytes,
    pack_inputs,
)
from rahf_serve.lora_slots import LoraSlots
from rahf_serve.models import load_base
from tests.serving.conftest import load_lively

ATOL = 1e-4


@dataclass
class Script:
    """One request: its prompt, how many tokens it generates, when it joins, its prefill chunk size."""

    prompt: list[int]
    new_tokens: int
    join: int = 0
    chunk: int | None = None
    adapter: str | None = None
    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    fed: int = 0

    def next_chunk(self) -> list[int]:
        if self.fed < len(self.prompt):
            end = len(self.prompt) if self.chunk is None else min(len(self.prompt), self.fed + self.chunk)
            chunk, self.fed = self.prompt[self.fed:end], end
            return chunk
        return [self.tokens[-1]]


@dataclass
class Run:
    scripts: list[Script]
    data_ptrs: set[int]
    moves: int
    """leaves that moved the last row into a freed slot"""


def forward(model: Any, cache: SlotCache, chunks: list[list[int]], start: int = 0,
            slots: list[int | None] | None = None, lora: LoraSlots | None = None) -> torch.Tensor:
    """One packed step in which slots start..start+len(chunks)-1 feed `chunks` and the other rows
    nothing; returns each feeding row's last-token logits. `lora`: its slot per row (`slots`)."""
    n_new = [0] * cache.rows
    n_new[start:start + len(chunks)] = [len(c) for c in chunks]
    step = cache.begin_step(n_new)
    if lora is not None:
        assert slots is not None
        lora.set_rows(slots, [len(c) for c in chunks])
    with cache.attending(model):
        out = model(input_ids=pack_inputs(chunks, cache.storage.device), attention_mask=step.attention_mask,
                    position_ids=step.position_ids, cache=cache, use_cache=True, logits_to_keep=step.logits_to_keep)
    cache.end_step()
    if lora is not None:
        lora.clear_rows()
    return step.last_logits(out.logits)


def run_batched(model: Any, scripts: list[Script], max_rows: int = 8, max_len: int = 128,
                prefill_apart: bool = False, lora: LoraSlots | None = None) -> Run:
    """Serve `scripts` through one SlotCache, greedy. `prefill_apart`: joining rows are prefilled in a
    forward of their own over their new slots (as the engine's _admit does), else in the shared step."""
    cache = SlotCache.for_model(model, max_rows, max_len)
    ptrs = {cache.storage.untyped_storage().data_ptr()}
    live: list[Script] = []
    step, moves = 0, 0
    while step <= max(s.join for s in scripts) or live:
        joining = [s for s in scripts if s.join == step]
        start = cache.add(len(joining))[0] if joining else 0
        live += joining
        if prefill_apart and joining:
            logits = forward(model, cache, [s.next_chunk() for s in joining], start, _slots(lora, joining), lora)
            _take(joining, logits)
        if live:
            logits = forward(model, cache, [s.next_chunk() for s in live], 0, _slots(lora, live), lora)
            _take(live, logits)
            done = [i for i, s in enumerate(live) if len(s.tokens) >= s.new_tokens]
            order = cache.remove(done)
            moves += sum(1 for i, j in enumerate(order) if i != j)
            live = [live[j] for j in order]
            assert cache.rows == len(live)
        ptrs |= {cache.storage.untyped_storage().data_ptr()} | {p for layer in cache.layers for p in (
            layer.keys.untyped_storage().data_ptr(), layer.values.untyped_storage().data_ptr())}
        step += 1
    return Run(scripts, ptrs, moves)


def _slots(lora: LoraSlots | None, rows: list[Script]) -> list[int | None] | None:
    return None if lora is None else [None if s.adapter is None else lora.slot_of(s.adapter) for s in rows]


def _take(rows: list[Script], logits: torch.Tensor) -> None:
    """Record a greedy token for each row whose prompt has been fed completely."""
    for s, row_logits in zip(rows, logits, strict=True):
        if s.fed == len(s.prompt) and len(s.tokens) < s.new_tokens:
            s.logits.append(row_logits.clone())
            s.tokens.append(int(row_logits.argmax()))


def alone(model: Any, prompt: list[int], new_tokens: int, adapter: str | None = None) -> tuple[list[int], list]:
    """The reference: one prompt, transformers' DynamicCache, greedy."""
    cache = DynamicCache(config=model.config)
    # A PeftModel without adapter_names would run its active adapter, not the base.
    extra = {"adapter_names": [adapter or "__base__"]} if hasattr(model, "peft_config") else {}
    out = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, **extra)
    tokens, logits = [], []
    for _ in range(new_tokens):
        logits.append(out.logits[0, -1])
        tokens.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True, **extra)
    return tokens, logits


def assert_matches_alone(model: Any, run: Run, atol: float = ATOL) -> None:
    for s in run.scripts:
        tokens, logits = alone(model, s.prompt, s.new_tokens, s.adapter)
        assert s.tokens == tokens, f"prompt of {len(s.prompt)} tokens joining at step {s.join}"
        for got, want in zip(s.logits, logits, strict=True):
            torch.testing.assert_close(got, want, atol=atol, rtol=0)


def prompts(seed: int, lengths: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module")
def lively(lively_model_dir) -> Any:
    return load_lively(lively_model_dir).model


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.inference_mode():
        yield


def _vocab(model: Any) -> int:
    return int(model.config.vocab_size)


# ---------------------------------------------------------------- equal to decoding alone


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_prompts_of_different_lengths_batched_match_each_alone(lively_model_dir, attention):
    model = load_lively(lively_model_dir).model
    model.set_attn_implementation(attention)
    run = run_batched(model, [Script(p, 6) for p in prompts(0, [3, 11, 6, 1], _vocab(model))])
    assert_matches_alone(model, run)
    assert len(run.data_ptrs) == 1


@pytest.mark.parametrize("prefill_apart", [False, True])
def test_staggered_joins_and_leaves_match_alone(lively, prefill_apart):
    # Row 1 (of 3) finishes first, so the last row moves into its slot while others keep decoding.
    p = prompts(1, [5, 9, 4, 7, 2], _vocab(lively))
    scripts = [Script(p[0], 8), Script(p[1], 4), Script(p[2], 7, join=1), Script(p[3], 4, join=3),
               Script(p[4], 3, join=9)]
    run = run_batched(lively, scripts, max_rows=4, prefill_apart=prefill_apart)
    assert_matches_alone(lively, run)
    assert run.moves >= 1
    assert len(run.data_ptrs) == 1


def test_chunked_prefill_while_other_rows_decode_matches_alone(lively):
    p = prompts(2, [6, 3, 40, 13], _vocab(lively))
    scripts = [Script(p[0], 12), Script(p[1], 9), Script(p[2], 4, join=2, chunk=7),
               Script(p[3], 3, join=4, chunk=5)]
    run = run_batched(lively, scripts)
    assert_matches_alone(lively, run)
    assert len(run.data_ptrs) == 1


def test_decode_rows_of_far_apart_lengths_attend_in_separate_calls_and_match_alone(lively):
    # A row 600 tokens long decodes between short ones (and a prompt is fed one token at a time beside
    # them): each far-apart length gets its own call, so the short rows do not read 600 keys each.
    p = prompts(4, [5, 600, 7, 9], _vocab(lively))
    scripts = [Script(p[0], 6), Script(p[1], 5), Script(p[2], 6), Script(p[3], 3, join=2, chunk=1)]
    run = run_batched(lively, scripts, max_len=640)
    assert_matches_alone(lively, run)
    cache = SlotCache.for_model(lively, 4, 640)
    cache.add(4)
    forward(lively, cache, [q[:n] for q, n in zip(p, [5, 600, 7, 9], strict=True)])
    groups = cache.begin_step([1, 1, 1, 1]).groups
    assert [(g.rows, g.width) for g in groups] == [(slice(0, 1), 6), (slice(1, 2), 601), (slice(2, 4), 10)]
    assert all(g.decode for g in groups)
    cache.end_step()
    near = SlotCache.for_model(lively, 4, 640)
    near.add(3)
    forward(lively, near, [q[:n] for q, n in zip(p[:3], [5, 90, 7], strict=True)])
    assert len(near.begin_step([1, 1, 1]).groups) == 1  # close enough: one call


def test_mixed_adapter_rows_through_lora_slots(lively_model_dir):
    """Rows with different LoRAs (engine slots, packed) against each prompt alone through PEFT."""
    torch.manual_seed(0)
    plain = load_lively(lively_model_dir).model
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # random, non-zero B
    peft = get_peft_model(load_lively(lively_model_dir).model, cfg, adapter_name="kind")
    peft.add_adapter("terse", cfg)
    peft.eval()
    lora = LoraSlots(plain, max_loras=2, max_rank=4)
    for name in ("kind", "terse"):
        config = json.loads(json.dumps(peft.peft_config[name].to_dict(), default=sorted))  # as adapter_config.json
        lora.load(name, get_peft_model_state_dict(peft, adapter_name=name), config)
    p = prompts(3, [4, 8, 5], _vocab(plain))
    scripts = [Script(p[0], 5, adapter="kind"), Script(p[1], 5, adapter="terse"), Script(p[2], 5, join=2)]
    run = run_batched(plain, scripts, lora=lora)
    assert_matches_alone(peft, run)


def _tiny(config_cls: type, **overrides: Any) -> Any:
    torch.manual_seed(0)
    config = config_cls(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        initializer_range=0.3, **overrides)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("config_cls, overrides", [
    (LlamaConfig, {}),
    (MistralConfig, {"sliding_window": None}),
    (MistralConfig, {"sliding_window": 128}),  # a window as long as max_len never hides a key
    (Qwen2Config, {}),
    (Qwen3Config, {"head_dim": 16}),
])
def test_supported_families_match_alone(config_cls, overrides):
    model = _tiny(config_cls, **overrides)
    p = prompts(4, [5, 12, 3, 20], 128)
    scripts = [Script(p[0], 6), Script(p[1], 2), Script(p[2], 5, join=1), Script(p[3], 3, join=2, chunk=6)]
    assert_matches_alone(model, run_batched(model, scripts, max_len=128))


@pytest.mark.slow
def test_real_default_model_matches_alone():
    model = load_base("smollm2-135m-instruct", device="cpu", dtype="float32").model
    p = prompts(5, [9, 30, 4, 17], 4000)
    scripts = [Script(p[0], 5), Script(p[1], 2), Script(p[2], 4, join=1), Script(p[3], 3, join=2, chunk=6)]
    run = run_batched(model, scripts)
    assert_matches_alone(model, run)
    assert len(run.data_ptrs) == 1


# ---------------------------------------------------------------- packing and masks


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_rows_that_feed_nothing_are_untouched_and_the_model_is_restored(lively_model_dir, attention):
    lively = load_lively(lively_model_dir).model
    lively.set_attn_implementation(attention)
    cache = SlotCache.for_model(lively, 4, 64)
    cache.add(3)
    p = prompts(6, [5, 2, 4], _vocab(lively))
    forward(lively, cache, p)
    kept = cache.storage[:, :, :3].clone()
    # Row 0 feeds 1 token, row 1 feeds 6, row 2 nothing: 7 tokens computed, none of them padding.
    logits = forward(lively, cache, [[7], [1, 2, 3, 4, 5, 6]])
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    assert cache.lengths == [6, 8, 4]
    assert lively.config._attn_implementation == attention  # the model's own attention outside a step
    for row, n in enumerate([5, 2, 4]):  # real keys are never overwritten
        assert torch.equal(cache.storage[:, :, row, :, :n], kept[:, :, row, :, :n])
    assert torch.equal(cache.storage[:, :, 2], kept[:, :, 2])  # row 2 took no part
    # Row 0's token got the same logits as in a step of its own (up to float32 rounding, which differs
    # between a packed and a one-row matmul by ~1e-5 on this wide-init model).
    solo = SlotCache.for_model(lively, 1, 64)
    solo.add(1)
    forward(lively, solo, [p[0]])
    torch.testing.assert_close(logits[0], forward(lively, solo, [[7]])[0], atol=1e-4, rtol=0)


def test_packed_positions_and_masks_follow_each_rows_length(lively):
    cache = SlotCache.for_model(lively, 4, 32)
    cache.add(3)
    forward(lively, cache, [[5, 6, 7], [8], [9]])
    step = cache.begin_step([1, 1, 3])  # two decode rows (one attention call), one prompt chunk
    assert step.position_ids.tolist() == [[3, 1, 1, 2, 3]]
    assert step.rows.tolist() == [0, 1, 2, 2, 2] and step.columns.tolist() == [3, 1, 1, 2, 3]
    assert step.logits_to_keep.tolist() == [0, 1, 4]
    decode, chunk = step.groups
    assert decode.decode and decode.rows == slice(0, 2) and decode.width == 4
    assert decode.mask[:, 0, 0].tolist() == [[True, True, True, True], [True, True, False, False]]
    assert not chunk.decode and chunk.tokens == slice(2, 5) and chunk.width == 4
    assert chunk.mask[0, 0].tolist() == [[True, True, False, False], [True, True, True, False],
                                         [True, True, True, True]]
    assert step.offsets() == [0, 1, 2]


# ---------------------------------------------------------------- rows, storage and capacity


def test_remove_moves_the_last_rows_into_the_gaps(lively):
    cache = SlotCache.for_model(lively, 5, 16)
    cache.add(5)
    forward(lively, cache, prompts(7, [1, 2, 3, 4, 5], _vocab(lively)))
    before = cache.storage.clone()
    order = cache.remove([1, 3])
    assert order == [0, 4, 2]
    assert cache.lengths == [1, 5, 3]
    for new, old in enumerate(order):
        n = cache.lengths[new]
        assert torch.equal(cache.storage[:, :, new, :, :n], before[:, :, old, :, :n])
    assert cache.remove([2]) == [0, 1] and cache.add(1) == [2] and cache.lengths == [1, 5, 0]
    with pytest.raises(IndexError):
        cache.remove([7])


def test_swap_exchanges_two_rows_up_to_the_longer(lively):
    cache = SlotCache.for_model(lively, 3, 16)
    cache.add(3)
    forward(lively, cache, prompts(8, [2, 6, 4], _vocab(lively)))
    before = cache.storage.clone()
    cache.swap(0, 1)
    assert cache.lengths == [6, 2, 4]
    assert torch.equal(cache.storage[:, :, 0, :, :6], before[:, :, 1, :, :6])
    assert torch.equal(cache.storage[:, :, 1, :, :2], before[:, :, 0, :, :2])
    assert torch.equal(cache.storage[:, :, 2], before[:, :, 2])
    with pytest.raises(IndexError):
        cache.swap(0, 3)


def test_a_copied_prefix_continues_as_the_row_it_came_from(lively):
    """Row 1 holds the first 2 tokens of row 0's prompt; copying up to 5 fills in 2..4 only, and feeding the
    prompt's last token then gives row 0's logits for it."""
    cache = SlotCache.for_model(lively, 3, 16)
    cache.add(3)
    (prompt,) = prompts(9, [6], _vocab(lively))
    want = forward(lively, cache, [prompt, prompt[:2], [7, 7, 7]])[0]
    before = cache.storage.clone()
    cache.copy_prefix(0, 1, 5)
    assert cache.lengths == [6, 5, 3]
    assert torch.equal(cache.storage[:, :, 1, :, 2:5], before[:, :, 0, :, 2:5])
    outside = torch.ones(16, dtype=torch.bool)
    outside[2:5] = False  # what row 1 held and what lies past the copy are its own
    assert torch.equal(cache.storage[:, :, 1, :, outside], before[:, :, 1, :, outside])
    assert torch.equal(cache.storage[:, :, 2], before[:, :, 2])
    got = forward(lively, cache, [prompt[5:]], start=1)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    for source, target, n in ((1, 1, 6), (0, 2, 2), (2, 1, 7), (0, 5, 3)):  # itself; less than held; past either
        with pytest.raises((ValueError, IndexError)):
            cache.copy_prefix(source, target, n)


def test_leaving_rows_are_kept_in_free_slots_until_taken(lively):
    """A row leaving last stays in its slot; one leaving from the middle trades slots with the row that
    moves in when it holds no more tokens than that row, else its keys are overwritten. New rows start from
    kept slots: their own (nothing copied) or one past the new rows (copied); a source among the other new
    slots, or more tokens than kept, is refused."""
    cache = SlotCache.for_model(lively, 5, 16)
    cache.add(4)
    forward(lively, cache, prompts(11, [5, 4, 3, 6], _vocab(lively)))
    before = cache.storage.clone()
    assert cache.remove([0, 3]) == [2, 1] and cache.lengths == [3, 4]  # row 0 (5 tokens) over row 2 (3)
    assert cache.kept == {3: 6} and cache.left_in == {3: 3}
    assert cache.remove([0]) == [1] and cache.kept == {1: 3, 3: 6} and cache.left_in == {0: 1}  # traded
    assert torch.equal(cache.storage[:, :, 0, :, :4], before[:, :, 1, :, :4])
    assert torch.equal(cache.storage[:, :, 1, :, :3], before[:, :, 2, :, :3])
    with pytest.raises(ValueError):
        cache.add(2, [None, (3, 7)])  # slot 3 holds 6
    with pytest.raises(ValueError):
        cache.add(3, [(3, 6), (1, 3), None])  # new rows 1, 2, 3: the first would overwrite slot 3 too early
    assert cache.lengths == [4] and cache.kept == {1: 3, 3: 6}  # refused before anything changed
    assert cache.add(2, [None, (3, 4)]) == [1, 2] and cache.lengths == [4, 0, 4] and cache.kept == {3: 6}
    assert torch.equal(cache.storage[:, :, 2, :, :4], before[:, :, 3, :, :4])
    cache.remove([2])
    assert cache.kept == {2: 4, 3: 6}
    assert cache.add(2, [(2, 3), (3, 6)]) == [2, 3] and cache.lengths == [4, 0, 3, 6] and cache.kept == {}
    assert torch.equal(cache.storage[:, :, 3, :, :6], before[:, :, 3, :, :6])
    cache.remove([3, 2])
    cache.clear()
    assert cache.kept == {}


def test_capacity_errors_name_the_limits(lively):
    cache = SlotCache.for_model(lively, 2, 8)
    cache.add(2)
    with pytest.raises(SlotsFull, match="2 row slots"):
        cache.add(1)
    forward(lively, cache, [[1] * 8, [2] * 3])  # exactly max_len fits
    with pytest.raises(ContextFull, match="row 0 would hold 9 tokens; the KV cache holds 8"):
        cache.begin_step([1, 1])
    assert cache.lengths == [8, 3]  # the refused step changed nothing
    assert ContextFull.status == 400 and SlotsFull.status == 503
    with pytest.raises(ValueError):
        cache.begin_step([0, 0])
    with pytest.raises(IndexError):
        cache.begin_step([1])
    with pytest.raises(RuntimeError, match="begin_step"):
        _ = SlotCache.for_model(lively, 1, 4).step


def test_memory_estimate_is_what_the_cache_allocates(lively):
    cache = SlotCache.for_model(lively, 3, 50)
    assert kv_cache_bytes(lively.config, 3, 50, torch.float32) == cache.storage.nbytes
    # SmolLM2-135M: 30 layers x 3 kv heads x 64 dims, bf16: 8 rows of 2048 tokens take ~189 MB.
    smol = KVShape(layers=30, kv_heads=3, head_dim=64)
    assert smol.bytes(8, 2048, torch.bfloat16) == 2 * 30 * 8 * 3 * 2048 * 64 * 2


# ---------------------------------------------------------------- models it must refuse


@pytest.mark.parametrize("config, reason", [
    (MistralConfig(sliding_window=64), "sliding-window attention \\(window 64\\) over rows of up to 128"),
    (Qwen2Config(use_sliding_window=True, sliding_window=32, max_window_layers=1, num_hidden_layers=2),
     "layer types \\['sliding_attention'\\]"),
    (Gemma2Config(), "only llama"),
    (LlamaConfig(layer_types=["full_attention", "chunked_attention"], num_hidden_layers=2), "chunked_attention"),
])
def test_unsupported_models_are_refused_by_type_and_reason(config, reason):
    with pytest.raises(UnsupportedModelError, match=f"{config.model_type!r}.*{reason}"):
        check_supported(config, max_len=128)


def test_refusal_happens_before_allocation():
    model = _tiny(MistralConfig, sliding_window=16)
    with pytest.raises(UnsupportedModelError, match="'mistral'"):
        SlotCache.for_model(model, 2, 64)
    assert SlotCache.for_model(model, 2, 16).max_len == 16
