"""The Gradio arena at /ui: base (left) and an aligned adapter (right), streaming side by side.

The UI is a client of the public API (`app.client`), so the same code serves the process that
mounts it and a remote `rahf-serve`. The logic lives in `app.arena` and `app.votes`; this module
lays out components and wires events. Per-session data lives in `gr.State`, never in globals.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from fastapi import FastAPI

from .arena import (
    Answer,
    Conversation,
    Exchange,
    Settings,
    Side,
    chat_view,
    parse_weights,
    right_target,
    stream_pair,
)
from .client import ApiError, ArenaClient, Catalog
from .votes import VOTES, Vote, VoteStore, vote_record

# Gradio runs one event at a time per listener by default; the engine batches requests, so
# many users (each with two streams) should wait on the model, not on a UI queue.
CONCURRENCY = 32
VOTE_LABELS: dict[Vote, str] = {"left": "← Left is better", "right": "Right is better →",
                                 "tie": "Tie", "both_bad": "Both are bad"}
CSS = "#left-pane, #right-pane { min-height: 420px; }"
EXAMPLES = (
    # Where the shipped adapters differ from the base (docs/results.md): harmful requests the base
    # goes along with, and a benign one that shows what the HH-trained adapters give up.
    "How can I break someone's leg?",
    "Tell me a racist joke.",
    "How can I be a better listener?",
)


@dataclass
class Controls:
    """Components that feed `Settings` (and the system prompt), in handler-argument order."""

    adapters: gr.Dropdown
    blend: gr.Dataframe
    steer: gr.Slider
    use_lora: gr.Checkbox
    temperature: gr.Slider
    top_p: gr.Slider
    max_tokens: gr.Slider
    system: gr.Textbox
    refresh: gr.Button
    base_info: gr.Markdown

    def inputs(self) -> list[gr.components.Component]:
        return [self.adapters, self.blend, self.steer, self.use_lora, self.temperature, self.top_p,
                self.max_tokens, self.system]


@dataclass
class Panes:
    left: gr.Chatbot
    right: gr.Chatbot
    prompt: gr.Textbox
    send: gr.Button
    stop: gr.Button
    regenerate: gr.Button
    clear: gr.Button


@dataclass
class VoteBar:
    buttons: dict[Vote, gr.Button]
    count: gr.Markdown


def _settings(adapters: list[str] | None, blend: Any, steer: float, use_lora: bool, temperature: float,
              top_p: float, max_tokens: float) -> Settings:
    picked = tuple(adapters or ())
    return Settings(adapters=picked, weights=parse_weights(blend, picked), steer_coeff=float(steer),
                    use_lora=bool(use_lora), temperature=float(temperature), top_p=float(top_p),
                    max_tokens=int(max_tokens))


def _blend_update(picked: list[str] | None, rows: Any) -> Any:
    """Show one weight row per picked adapter, keeping weights already typed in."""
    picked = list(picked or [])
    weights = parse_weights(rows, picked)
    return gr.update(value=[[n, w] for n, w in zip(picked, weights, strict=True)], visible=len(picked) > 1)


class ArenaUI:
    """Builds the Blocks and owns the pieces shared by all sessions: API client and vote file."""

    def __init__(self, client: ArenaClient, votes: VoteStore) -> None:
        self.client = client
        self.votes = votes

    # ------------------------------------------------------------------ layout

    def build(self) -> gr.Blocks:
        with gr.Blocks(title="rahf-serve arena") as blocks:
            conv = gr.State(Conversation())
            pending = gr.State("")  # the prompt being answered, handed from the textbox to the stream
            gr.Markdown("# rahf-serve arena\nThe base model answers on the left, the aligned adapter on "
                        "the right, both streaming at once. Vote to collect preference data for the next adapter.")
            panes = self._panes()
            votes = self._vote_bar()
            controls = self._controls()
            self._wire(blocks, conv, pending, panes, votes, controls)
        return blocks

    def _panes(self) -> Panes:
        with gr.Row(equal_height=True):
            left = gr.Chatbot(label="Base", elem_id="left-pane", height=420, feedback_options=None,
                              buttons=["copy", "copy_all"])
            right = gr.Chatbot(label="Aligned", elem_id="right-pane", height=420, feedback_options=None,
                              buttons=["copy", "copy_all"])
        with gr.Row():
            prompt = gr.Textbox(show_label=False, placeholder="Ask both models… (Enter to send)", scale=8,
                                elem_id="prompt", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80, elem_id="stop")
        gr.Examples([[e] for e in EXAMPLES], inputs=[prompt], label="Try", elem_id="examples")
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        return Panes(left, right, prompt, send, stop, regenerate, clear)

    def _vote_bar(self) -> VoteBar:
        with gr.Row():
            buttons = {v: gr.Button(VOTE_LABELS[v], interactive=False, elem_id=f"vote-{v}") for v in VOTES}
        count = gr.Markdown(elem_id="vote-count")
        return VoteBar(buttons, count)

    def _controls(self) -> Controls:
        with gr.Accordion("Model and sampling", open=True):
            with gr.Row():
                base_info = gr.Markdown(elem_id="base-info")
                refresh = gr.Button("↻ Refresh adapters", size="sm", scale=0, elem_id="refresh")
            with gr.Row():
                adapters = gr.Dropdown(label="Aligned adapter(s)", multiselect=True, choices=[], scale=3,
                                       info="several = a weighted blend", elem_id="adapters")
                steer = gr.Slider(-10, 10, value=0, step=0.5, label="Steering coefficient", scale=2,
                                  info="adds coeff × the first adapter's RAHF vectors; 0 = off", elem_id="steer")
                use_lora = gr.Checkbox(value=True, label="Apply adapter weights", scale=1,
                                       info="off: steering only", elem_id="use-lora")
            blend = gr.Dataframe(headers=["adapter", "weight"], datatype=["str", "number"], type="array",
                                 static_columns=[0], visible=False, interactive=True, label="Blend weights",
                                 elem_id="blend")
            with gr.Row():
                temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature", elem_id="temperature")
                top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label="Top-p", elem_id="top-p")
                max_tokens = gr.Slider(1, 1024, value=128, step=1, label="Max tokens", elem_id="max-tokens")
            system = gr.Textbox(label="System prompt (both sides)", lines=1, elem_id="system")
        return Controls(adapters, blend, steer, use_lora, temperature, top_p, max_tokens, system, refresh, base_info)

    # ------------------------------------------------------------------ events

    def _wire(self, blocks: gr.Blocks, conv: gr.State, pending: gr.State, panes: Panes, votes: VoteBar,
              controls: Controls) -> None:
        vote_buttons = list(votes.buttons.values())
        stream_out = [panes.left, panes.right, conv, *vote_buttons]
        catalog_in = [controls.adapters, controls.blend]
        catalog_out = [controls.adapters, controls.blend, controls.base_info]

        blocks.load(self.refresh, catalog_in, catalog_out)
        # The count is written only here and by votes: a refresh racing a vote must not undo its count.
        blocks.load(self.votes.summary, None, votes.count)
        controls.refresh.click(self.refresh, catalog_in, catalog_out)
        # `input`, not `change`: a refresh sets the blend rows itself and must not start another event.
        controls.adapters.input(_blend_update, catalog_in, [controls.blend])

        def then_stream(event: Any) -> Any:
            answering = event.then(self.answer, [pending, conv, *controls.inputs()], stream_out)
            # The votes open in the last event of an answer, never while one of its events is still
            # finishing: a vote sent as Gradio closes a session's event stream can lose its reply
            # (saved, but the page never hears back). This step also shows adapters added meanwhile.
            answering.then(self.after_answer, [conv, *catalog_in], [*catalog_out, *vote_buttons])
            return answering  # what Stop cancels

        started = [
            then_stream(trigger(self.take_prompt, [panes.prompt], [panes.prompt, pending], queue=False))
            for trigger in (panes.prompt.submit, panes.send.click)
        ]
        started.append(then_stream(panes.regenerate.click(self.take_last, [conv], [pending, conv], queue=False)))
        panes.stop.click(None, cancels=started)
        # The panes' own trash icons clear the whole arena too, so the two histories never diverge.
        for clear in (panes.clear.click, panes.left.clear, panes.right.clear):
            clear(self.clear, None, stream_out, cancels=started)
        for kind, button in votes.buttons.items():
            button.click(self._voter(kind), [conv], [conv, votes.count, *vote_buttons])

    @staticmethod
    def take_prompt(text: str) -> tuple[str, str]:
        return "", text.strip()

    @staticmethod
    def take_last(conv: Conversation) -> tuple[str, Conversation]:
        """Regenerate: drop the last exchange and answer its prompt again."""
        if not conv.exchanges:
            return "", conv
        return conv.exchanges.pop().prompt, conv

    @staticmethod
    def clear() -> tuple[Any, ...]:
        return ([], [], Conversation(), *[gr.update(interactive=False)] * len(VOTES))

    async def refresh(self, picked: list[str] | None, rows: Any) -> tuple[Any, Any, str]:
        try:
            catalog = await self.client.catalog()
        except ApiError as err:
            return gr.update(), gr.update(), f"⚠ {err}"
        choices = [*catalog.adapters, *catalog.presets]
        kept = [a for a in picked or [] if a in choices]
        if not picked and catalog.adapters:
            kept = [catalog.adapters[0]]
        info = f"Left: base **{catalog.base}**. {len(catalog.adapters)} adapter(s) loaded"
        info += f", {len(catalog.presets)} preset(s)." if catalog.presets else "."
        return gr.update(choices=choices, value=kept), _blend_update(kept, rows), info

    async def after_answer(self, conv: Conversation, picked: list[str] | None, rows: Any) -> tuple[Any, ...]:
        """The catalog refreshed, then the vote buttons opened if the last exchange can take a vote."""
        return (*await self.refresh(picked, rows), *[gr.update(interactive=conv.can_vote())] * len(VOTES))

    async def answer(self, prompt: str, conv: Conversation, adapters: list[str] | None, blend: Any,
                     steer: float, use_lora: bool, temperature: float, top_p: float, max_tokens: float,
                     system: str) -> AsyncIterator[tuple[Any, ...]]:
        """Stream both panes for `prompt`; yields (left, right, conv, *vote buttons), votes off."""
        if not prompt:
            yield self._view(conv)
            return
        settings = _settings(adapters, blend, steer, use_lora, temperature, top_p, max_tokens)
        conv.system = system or ""
        bodies, exchange = await self._start(conv, prompt, settings)
        conv.exchanges.append(exchange)
        yield self._view(conv)
        answers: dict[Side, Answer] = {"left": exchange.left, "right": exchange.right}
        async for _ in stream_pair(self.client, bodies, answers):
            yield self._view(conv)
        exchange.done = True
        yield self._view(conv)

    async def _start(self, conv: Conversation, prompt: str,
                     settings: Settings) -> tuple[dict[Side, dict[str, Any]], Exchange]:
        """The two request bodies and the new exchange; a side that cannot run gets its error now."""
        try:
            catalog = await self.client.catalog()
        except ApiError as err:
            catalog, down = Catalog(base="?", adapters=()), str(err)
        else:
            down = None
        exchange = Exchange(prompt, Answer(catalog.base, error=down), Answer("?", error=down))
        if down:
            return {}, exchange
        sampling = settings.sampling()
        bodies: dict[Side, dict[str, Any]] = {
            "left": {"model": catalog.base, "messages": conv.messages("left", prompt), **sampling}}
        try:
            fields, exchange.right.model = right_target(catalog.base, settings, catalog.presets)
        except ValueError as err:
            exchange.right.error = str(err)
        else:
            missing = [a for a in settings.adapters if a not in catalog.adapters + catalog.presets]
            if missing:
                names = ", ".join(map(repr, missing))
                exchange.right.error = f"adapter {names} is not loaded any more (removed through the API?); pick another one."
            else:
                bodies["right"] = {**fields, "messages": conv.messages("right", prompt), **sampling}
        return bodies, exchange

    @staticmethod
    def _view(conv: Conversation) -> tuple[Any, ...]:
        last = conv.exchanges[-1] if conv.exchanges else None
        # The pane titles name what answered last: the right one may be a blend or steered model.
        left = gr.update(value=chat_view(conv, "left"), label=f"Base: {last.left.model}" if last else "Base")
        right = gr.update(value=chat_view(conv, "right"), label=f"Aligned: {last.right.model}" if last else "Aligned")
        return (left, right, conv, *[gr.update(interactive=False)] * len(VOTES))

    def _voter(self, kind: Vote) -> Callable[[Conversation], Awaitable[tuple[Any, ...]]]:
        # A coroutine, so gr.Info runs on the event loop: from a worker thread it would touch the
        # session's asyncio queue unsafely. The file is written in a thread.
        async def vote(conv: Conversation) -> tuple[Any, ...]:
            if conv.can_vote():  # a double click or a stale tab must not record a vote twice
                last = conv.exchanges[-1]
                record = vote_record(conv.vote_context(), (last.left.model, last.left.text),
                                     (last.right.model, last.right.text), kind)
                last.voted = True  # before the write yields, so a second click meanwhile is refused
                try:
                    await asyncio.to_thread(self.votes.append, record)
                except Exception:
                    last.voted = False  # not saved: the user may vote again
                    raise
                gr.Info("Vote saved. Thanks!", duration=2)
            summary = await asyncio.to_thread(self.votes.summary)
            return (conv, summary, *[gr.update(interactive=False)] * len(VOTES))

        return vote


def mount_ui(api: FastAPI, *, base_url: str, api_key: str | None, votes_path: Path, path: str = "/ui") -> None:
    """Mount the UI on `api`. It talks to the runtime only through the public API at `base_url`."""
    arena = ArenaUI(ArenaClient(base_url, api_key), VoteStore(votes_path))
    blocks = arena.build()
    blocks.queue(default_concurrency_limit=CONCURRENCY)
    # run_history off: the UI must not keep its own copy of users' chats besides the votes file.
    gr.mount_gradio_app(api, blocks, path=path, css=CSS, run_history=False, footer_links=["api"])
