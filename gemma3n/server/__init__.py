"""OpenAI-compatible HTTP server: `gemma3n serve`, or `create_app(model, settings)` for your own ASGI host.

Needs the `serve` extra (fastapi, uvicorn).
"""
from __future__ import annotations

from .settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def create_app(model, settings: ServerSettings | None = None):
    from .app import create_app as build
    return build(model, settings)


def serve(model, settings: ServerSettings, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Serve `model` until interrupted (blocking)."""
    import uvicorn
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
