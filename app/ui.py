"""The Gradio arena at /ui. (Placeholder until the UI lands: mounts a page with a title.)"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI


def mount_ui(api: FastAPI, *, base_url: str, api_key: str | None, votes_path: Path, path: str = "/ui") -> None:
    """Mount the UI on `api`. It talks to the runtime only through the public API at `base_url`."""
    import gradio as gr

    with gr.Blocks(title="rahf-serve") as blocks:
        gr.Markdown("# rahf-serve")
    gr.mount_gradio_app(api, blocks, path=path)
