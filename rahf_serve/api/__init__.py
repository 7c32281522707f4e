"""The OpenAI-compatible HTTP API (FastAPI). The engine and registry below it know nothing of HTTP."""

from .app import create_app

__all__ = ["create_app"]
