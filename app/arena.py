"""The arena's logic without Gradio: conversation state, request bodies, the paired stream.

Each pane keeps its own history (the base never sees the aligned model's answers and vice
versa), so the state is a list of exchanges: one user prompt and the two answers to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .client import ApiError, ArenaClient

Side = Literal["left", "right"]


@dataclass
class Answer:
    model: str
    text: str = ""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.text.strip())


@dataclass
class Exchange:
    prompt: str
    left: Answer
    right: Answer
    done: bool = False
    voted: bool = False


@dataclass
class Conversation:
    """One browser session's arena: kept in a `gr.State`, so every tab has its own."""

    system: str = ""
    exchanges: list[Exchange] = field(default_factory=list)

    def messages(self, side: Side, prompt: str) -> list[dict[str, str]]:
        """The OpenAI messages that `side` answers next: its own earlier answers, then `prompt`.

        Turns where this side failed are left out, so an error text is never fed back as if
        the model had said it.
        """
        msgs = [{"role": "system", "content": self.system}] if self.system.strip() else []
        for ex in self.exchanges:
            answer: Answer = getattr(ex, side)
            if answer.error is None:
                msgs += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": answer.text}]
        return msgs + [{"role": "user", "content": prompt}]

    def vote_context(self) -> list[dict[str, str]]:
        """The prompt a vote on the last exchange records: the left (base) pane's conversation.

        The two panes' earlier answers differ, so a multi-turn vote needs one context; the base
        side is the neutral one. For a first turn both sides saw exactly this.
        """
        last = self.exchanges[-1]
        earlier = Conversation(system=self.system, exchanges=self.exchanges[:-1])
        return earlier.messages("left", last.prompt)

    def can_vote(self) -> bool:
        if not self.exchanges:
            return False
        last = self.exchanges[-1]
        return last.done and not last.voted and last.left.ok and last.right.ok


def chat_view(conv: Conversation, side: Side) -> list[dict[str, str]]:
    """What a pane's Chatbot shows: its prompts and answers, errors as a marked message."""
    view: list[dict[str, str]] = []
    for ex in conv.exchanges:
        answer: Answer = getattr(ex, side)
        text = f"⚠ {answer.error}" if answer.error else answer.text
        view += [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": text}]
    return view


@dataclass(frozen=True)
class Settings:
    """The controls that shape the requests; the same sampling goes to both panes."""

    adapters: tuple[str, ...] = ()
    weights: tuple[float, ...] = ()
    """One per adapter; used when several adapters are blended."""
    steer_coeff: float = 0.0
    """Added steering with the first adapter's mean-difference vectors; 0 means off."""
    use_lora: bool = True
    """False: the right pane is the base plus steering only, without adapter weights."""
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 256

    def sampling(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "max_tokens": int(self.max_tokens)}


def _fmt(x: float) -> str:
    return f"{x:g}"


def right_target(base: str, s: Settings, presets: Sequence[str] = ()) -> tuple[dict[str, Any], str]:
    """(request fields, description) for the right pane; the description names it in votes.

    A preset (one of `presets`) is its own model: picked alone, it is sent as `model` as it is.
    Raises ValueError when the settings do not describe an aligned model to compare with.
    """
    if not s.adapters:
        raise ValueError("pick an adapter for the right pane (none is loaded? add one with POST /v1/adapters)")
    picked = [a for a in s.adapters if a in presets]
    if picked:
        if len(s.adapters) > 1 or s.steer_coeff != 0 or not s.use_lora:
            raise ValueError(f"preset {picked[0]!r} carries its own blend and steering: pick it alone, with "
                             "adapter weights on and steering 0")
        return {"model": picked[0]}, picked[0]
    if s.steer_coeff == 0 and not s.use_lora:
        raise ValueError("with adapter weights off, set a non-zero steering coefficient")
    fields: dict[str, Any] = {"model": base}
    parts: list[str] = []
    if s.use_lora:
        weights = list(s.weights) if len(s.weights) == len(s.adapters) else [1.0] * len(s.adapters)
        if len(s.adapters) == 1 and weights[0] == 1.0:
            fields["model"] = s.adapters[0]
            parts.append(s.adapters[0])
        else:
            fields["adapters"] = [{"name": n, "weight": float(w)} for n, w in zip(s.adapters, weights, strict=True)]
            parts.append("blend(" + " + ".join(f"{_fmt(w)}*{n}" for n, w in zip(s.adapters, weights, strict=True)) + ")")
    else:
        parts.append(base)
    if s.steer_coeff != 0:
        fields["steering"] = {"adapter": s.adapters[0], "coeff": float(s.steer_coeff)}
        parts.append(f"steer({s.adapters[0]}, {_fmt(s.steer_coeff)})")
    return fields, " + ".join(parts)


async def stream_pair(client: ArenaClient, bodies: dict[Side, dict[str, Any]],
                      answers: dict[Side, Answer]) -> AsyncIterator[None]:
    """Stream both requests at once into `answers`, yielding after each batch of new text.

    Both requests are in flight together, so the engine batches them into the same forward
    passes. An error on one side ends only that side. Cancelling the consumer (Stop) cancels
    both requests, which closes their connections and stops generation on the server.
    """
    updates: asyncio.Queue[Side | None] = asyncio.Queue()

    async def pump(side: Side) -> None:
        try:
            async for delta in client.stream_chat(bodies[side]):
                answers[side].text += delta
                updates.put_nowait(side)
        except ApiError as err:
            hint = " (removed through the API?) Pick another adapter after ↻ Refresh adapters."
            answers[side].error = f"{err}{hint if err.adapter_missing else ''}"
        finally:
            updates.put_nowait(None)

    tasks = [asyncio.create_task(pump(side)) for side in bodies]
    try:
        running = len(tasks)
        while running:
            item = await updates.get()
            # Coalesce what arrived meanwhile: one UI update per wake-up, not per token.
            items = [item]
            while not updates.empty():
                items.append(updates.get_nowait())
            running -= items.count(None)
            yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def parse_weights(rows: Sequence[Sequence[Any]] | None, adapters: Sequence[str]) -> tuple[float, ...]:
    """Weights from the blend table (rows of [adapter, weight]) in the order of `adapters`."""
    table: dict[str, float] = {}
    for row in rows or []:
        if len(row) >= 2 and row[0]:
            try:
                table[str(row[0])] = float(row[1])
            except (TypeError, ValueError):
                continue  # a cell being edited or left blank: that adapter keeps weight 1
    return tuple(table.get(name, 1.0) for name in adapters)
