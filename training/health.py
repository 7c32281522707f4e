"""Generation health of a model: greedy answers to fixed prompts, and three numbers about them.

distinct-2 (unique token bigrams / all bigrams, pooled over answers) and mean length (generated
tokens up to the end of turn) catch repetition and answers that stop early; base log-lik (the
plain base's mean per-token log-likelihood of each answer, averaged over answers) catches what
those two miss: fluent-looking counts over text the base finds absurd, e.g. strings of odd symbols
from a representation pushed too far.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm

from .encode import Encoded
from .forward import response_logprob


@torch.no_grad()
def greedy(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
           batch: int = 8, desc: str | None = None) -> list[list[int]]:
    """Greedy answer token ids per prompt (left-padded batches), cut at the first end-of-turn/pad;
    a progress bar per batch with `desc`."""
    out, pad = [], tokenizer.pad_token_id
    device = next(model.parameters()).device
    for s in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", leave=False, disable=desc is None):
        chunk = prompts[s:s + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        gen = model.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=pad)
        for row in gen[:, width:].tolist():
            for stop in (tokenizer.eos_token_id, pad):
                if stop in row:
                    row = row[:row.index(stop)]
            out.append(row)
    return out


def distinct2(answers: list[list[int]]) -> float:
    grams = [tuple(a[i:i + 2]) for a in answers for i in range(len(a) - 1)]
    return len(set(grams)) / max(1, len(grams))


@torch.no_grad()
def base_loglik(model: torch.nn.Module, tokenizer, prompts: list[list[int]], answers: list[list[int]],
                batch: int = 8) -> float:
    """Mean over non-empty answers of the plain base's mean per-token log-likelihood of the answer
    (a PEFT model's adapters are disabled for it)."""
    examples = [Encoded(tuple(p + a), len(p)) for p, a in zip(prompts, answers, strict=True) if a]
    per_answer: list[float] = []
    with model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext():
        for s in range(0, len(examples), batch):
            ll, n = response_logprob(model, examples[s:s + batch], tokenizer.pad_token_id)
            per_answer += (ll / n.clamp(min=1)).tolist()
    return sum(per_answer) / max(1, len(per_answer))


def measure(model: torch.nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
            batch: int = 8, desc: str | None = None) -> dict[str, Any]:
    """Health figures of the model as it is now (active adapter, if any), with its answers; `desc`
    labels a progress bar over the answer batches."""
    answers = greedy(model, tokenizer, prompts, max_new_tokens, batch, desc)
    return {"distinct2": round(distinct2(answers), 4),
            "mean_length": round(sum(map(len, answers)) / max(1, len(answers)), 2),
            "base_loglik": round(base_loglik(model, tokenizer, prompts, answers, batch), 4),
            "answers": [tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]}
