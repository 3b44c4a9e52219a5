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
    """Serve `model` until SIGTERM / SIGINT (blocking). Then the listening socket closes at once, requests already
    received run to their end for up to `settings.drain_seconds`, and what still runs after that is cancelled. One
    log line per request (its id, route, status, seconds) replaces uvicorn's access log."""
    import logging

    import uvicorn
    logger = logging.getLogger("gemma3n")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    uvicorn.run(create_app(model, settings), host=host, port=port, log_level=log_level, access_log=False,
                timeout_graceful_shutdown=settings.drain_seconds)
