"""Turning pairs into token ids: chat-template rendering, truncation, padding, response masks.

Prompt and response are tokenized apart and concatenated, so a response has the same token ids
under any context or instruction: phase 2 can subtract hidden states token by token and phase 3
can line its targets up with them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from .data import Message


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    response_start: int
    """Index of the first response token; every later token is response."""

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.response_start


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    """1 where the token at that position is a response token."""
    response_start: torch.Tensor


def with_instruction(messages: list[Message], instruction: str | None) -> list[Message]:
    """Put an instruction first as the system prompt, ahead of any system prompt the data has."""
    if instruction is None:
        return messages
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{instruction}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain transcript that still separates the turns.
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message], max_tokens: int,
               instruction: str | None = None) -> list[int]:
    """Token ids of the rendered prompt (with `instruction` as system prompt), at most `max_tokens`.

    Too long a prompt loses text from, in turn: the oldest earlier turns (from their start), the
    data's own system prompt (from its end), the last turn (from its start). The instruction is
    never cut: cutting raw tokens from the left would remove SCIT's instruction from long prompts
    and leave nothing for phase 1 to contrast.
    """
    msgs = [dict(m) for m in messages]
    for _ in range(len(msgs) + 16):  # each round shortens or drops a turn; re-tokenizing can be off by a few
        ids = tokenizer(render_prompt(tokenizer, with_instruction(msgs, instruction)),
                        add_special_tokens=False)["input_ids"]
        excess = len(ids) - max_tokens
        if excess <= 0:
            return ids
        older = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system" and m["content"]]
        system = [i for i, m in enumerate(msgs) if m["role"] == "system" and m["content"]]
        if older or not system:
            turn = older[0] if older else len(msgs) - 1
            content = tokenizer(msgs[turn]["content"], add_special_tokens=False)["input_ids"]
            if not content:
                break
            if len(content) <= excess and older:
                del msgs[turn]
            else:
                msgs[turn]["content"] = tokenizer.decode(content[excess:])
        else:
            content = tokenizer(msgs[system[-1]]["content"], add_special_tokens=False)["input_ids"]
            msgs[system[-1]]["content"] = tokenizer.decode(content[:max(0, len(content) - excess)])
    return ids[-max_tokens:]  # the template and instruction alone are longer than max_tokens


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str, max_response: int) -> list[int]:
    reply = tokenizer(response, add_special_tokens=False)["input_ids"]
    # The end-of-turn token is part of what the model must learn to say, unless we cut the reply.
    return reply[:max_response] if len(reply) >= max_response else reply + [tokenizer.eos_token_id]


def encode(tokenizer: PreTrainedTokenizerBase, messages: list[Message], response: str, *,
           max_prompt: int, max_response: int, instruction: str | None = None) -> Encoded:
    prompt = prompt_ids(tokenizer, messages, max_prompt, instruction)
    return Encoded(tuple(prompt + response_ids(tokenizer, response, max_response)), len(prompt))


def collate(examples: list[Encoded], pad_id: int) -> Batch:
    """Right-padded batch; padding is masked out of attention and of the response mask."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(examples), width), dtype=torch.long)
    resp = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        attn[i, :n] = 1
        resp[i, e.response_start:n] = 1
    starts = torch.tensor([e.response_start for e in examples])
    return Batch(ids, attn, resp, starts)
