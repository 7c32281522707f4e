"""One object per RAHF variant: what differs between SCIT, DualLLMs and LoRRA lives here and only here.

A method owns its phase-1 adapters and trainer, its stimuli (which responses, under which
instructions), how phase 2 reads the two sides of a stimulus, and which phase-1 adapter the
shipped model contains. The phases themselves (phase1/collect/align) are method-agnostic.

    method        phase-1 adapters   stimuli (phase 2)                        shipped model
    scit          scit               a random answer per pair, p+ vs p-       scit + phase 3
    dual          good, bad          both answers per pair, good vs bad       good + phase 3
    lorra         (none)             a random answer per pair, p+ vs p-       base + phase 3
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from peft import PeftModel

from . import phase1
from .config import METHODS, TrainConfig
from .context import Context
from .data import Pair
from .encode import Encoded, encode
from .forward import block_outputs
from .rundir import RunDir


@dataclass(frozen=True)
class Stimulus:
    """Both sides of one phase-2 stimulus and the plain input phase 3 trains on; same response tokens."""

    pair: int
    side: str
    """"chosen" or "rejected": which answer of the pair is the response."""
    pos: Encoded
    neg: Encoded
    plain: Encoded


class Method:
    name: str
    adapters: tuple[str, ...] = ()
    """Phase-1 adapter names, in training order."""
    shipped_adapter: str | None = None
    """The phase-1 adapter that phase 3 builds on and the shipped model contains (None: the base)."""
    max_res_len: int = 512
    """Response tokens phase 2 keeps when collect.max_res_len is None (paper: SCIT 512, Dual 64)."""
    composition: str = ""
    """One line for the manifest: how the shipped model was built."""

    def phase1_steps(self, config: TrainConfig, n_pairs: int) -> int:
        return config.phase1.steps_for(self.name, n_pairs) if self.adapters else 0

    def train_phase1(self, ctx: Context) -> dict[str, list[float]]:
        raise NotImplementedError

    def responses(self, pairs: list[Pair], seed: int) -> list[tuple[int, str]]:
        """(pair index, "chosen"|"rejected") of every stimulus: one answer per pair, drawn at random
        with the run's seed (the reference code's `--data_type random`)."""
        rng = random.Random(seed)
        return [(i, rng.choice(("chosen", "rejected"))) for i in range(len(pairs))]

    def instructions(self, config: TrainConfig) -> tuple[str | None, str | None]:
        """System prompts of the positive and negative side (None: the data's own prompt only)."""
        return config.phase1.good_instruction, config.phase1.bad_instruction

    def stimuli(self, ctx: Context, tokenizer) -> list[Stimulus]:
        cfg = ctx.config
        d = cfg.data
        max_res = min(d.max_response_tokens, cfg.collect.max_res_len or self.max_res_len)
        good, bad = self.instructions(cfg)
        out = []
        pairs = ctx.data.pairs[:cfg.collect.pairs] if cfg.collect.pairs else ctx.data.pairs
        for i, side in self.responses(pairs, cfg.seed):
            pair = ctx.data.pairs[i]
            response = getattr(pair, side)

            def enc(instruction: str | None, pair=pair, response=response) -> Encoded:
                return encode(tokenizer, pair.chat(), response, max_prompt=d.max_prompt_tokens, max_response=max_res,
                              instruction=instruction)

            plain = enc(None)
            out.append(Stimulus(i, side, enc(good) if good else plain, enc(bad) if bad else plain, plain))
        return out

    def phase1_model(self, base_model: torch.nn.Module, run: RunDir) -> torch.nn.Module:
        """The phase-1 model(s) phase 2 reads hidden states from."""
        if not self.adapters:
            return base_model
        model = PeftModel.from_pretrained(base_model, str(run.adapter(self.adapters[0])), adapter_name=self.adapters[0])
        for name in self.adapters[1:]:
            model.load_adapter(str(run.adapter(name)), adapter_name=name)
        return model

    def separation(self, ctx: Context, model: torch.nn.Module, tokenizer) -> dict[str, float]:
        """Phase 1's separation on `phase1.val_rows` (what phase 2 checks), for `phase1_model`."""
        raise ValueError(f"{self.name} has no phase 1 to validate")

    def states(self, model: torch.nn.Module, pos: list[Encoded], neg: list[Encoded], pad: int, layers: list[int]
               ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Hidden states of the positive and negative sides: one model, two instructions."""
        return block_outputs(model, pos, pad, layers), block_outputs(model, neg, pad, layers)


class Scit(Method):
    name = "scit"
    adapters = ("scit",)
    shipped_adapter = "scit"
    composition = ("SCIT model + phase 3 trained on top of it (one LoRA, ranks concatenated): "
                   "target = H_scit(q r) + alpha * (H_scit(p+ q r) - H_scit(p- q r))")

    def train_phase1(self, ctx: Context) -> dict[str, list[float]]:
        return phase1.train_scit(ctx)

    def separation(self, ctx, model, tokenizer):
        return phase1.scit_separation(model, phase1.scit_val_quads(ctx, tokenizer), tokenizer.pad_token_id)


class Dual(Method):
    name = "dual"
    adapters = ("good", "bad")
    shipped_adapter = "good"
    max_res_len = 64
    composition = ("good model + phase 3 trained on top of it (one LoRA, ranks concatenated): "
                   "target = H_good(q r) + alpha * (H_good(q r) - H_bad(q r)), r both answers of each pair")

    def train_phase1(self, ctx: Context) -> dict[str, list[float]]:
        return phase1.train_dual(ctx)

    def separation(self, ctx, model, tokenizer):
        return phase1.dual_separation(model, phase1.dual_val_sides(ctx, tokenizer), tokenizer.pad_token_id)

    def responses(self, pairs: list[Pair], seed: int) -> list[tuple[int, str]]:
        # Both answers (the reference's `--data_type all`): the good-bad difference is a property
        # of the models, so rejected answers are as informative a stimulus as chosen ones.
        return [(i, side) for i in range(len(pairs)) for side in ("chosen", "rejected")]

    def instructions(self, config: TrainConfig) -> tuple[str | None, str | None]:
        return None, None

    def states(self, model, pos, neg, pad, layers):
        model.set_adapter("good")
        h_pos = block_outputs(model, pos, pad, layers)
        model.set_adapter("bad")
        return h_pos, block_outputs(model, neg, pad, layers)


class Lorra(Method):
    name = "lorra"
    composition = ("LoRRA ablation (no phase 1), phase 3 on the plain base: "
                   "target = H_base(q r) + alpha * (H_base(p+ q r) - H_base(p- q r))")

    def train_phase1(self, ctx: Context) -> dict[str, list[float]]:
        return phase1.skip(ctx)


_METHODS: dict[str, Method] = {m.name: m for m in (Scit(), Dual(), Lorra())}
assert tuple(_METHODS) == METHODS, "config.METHODS and the method objects disagree"


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {', '.join(_METHODS)}, got {name!r}") from None
