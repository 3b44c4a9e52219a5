"""One model behind the server's own ASGI app, called in process (no socket, no HTTP client).

A batch row is answered by the very code that answers `gemma3n serve`: the same validation, limits, errors,
defaults and continuous batching. The app runs on an event loop in a thread of its own, so that both a plain
runner and a Ray actor (whose calls are synchronous) can hand it requests and wait for their answers.
"""
from __future__ import annotations

import asyncio
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..server import ServerSettings, create_app


@dataclass(frozen=True)
class EngineSpec:
    """How to build one engine: what to load and the server limits it answers with (picklable, so a Ray actor
    on another machine can build its own)."""

    model: str  # checkpoint folder, .gguf file or cached Hub id; the same path on every machine
    load: dict = field(default_factory=dict)  # gemma3n.load keywords: dtype, quantize, activations, matformer, adapter
    settings: ServerSettings = field(default_factory=ServerSettings)
    threads: int | None = None  # torch / OpenMP threads of this engine (None: leave as they are)

    def load_model(self):
        import torch

        import gemma3n
        if self.threads:
            torch.set_num_threads(self.threads)
        return gemma3n.load(self.model, **{k: v for k, v in self.load.items() if v is not None})


class Engine:
    """The server's app for `model`, started (its scheduler thread runs) until `close()`."""

    def __init__(self, model, settings: ServerSettings):
        self.settings = settings
        self.app = create_app(model, settings)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gemma3n-batch-loop", daemon=True)
        self.thread.start()
        self._lifespan = _Lifespan(self.app)
        self.submit(self._lifespan.startup()).result()

    @classmethod
    def from_spec(cls, spec: EngineSpec) -> "Engine":
        return cls(spec.load_model(), spec.settings)

    def submit(self, coroutine) -> Future:
        """Run `coroutine` on the engine's loop; its result arrives in the returned future."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    async def post(self, path: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
        """POST `body` to the app's `path`: (status, response body), as a client of the server would get them."""
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        if self.settings.api_key:
            headers.append((b"authorization", b"Bearer " + self.settings.api_key.encode()))
        return await _call(self.app, "POST", path, body, headers)

    async def post_file(self, path: str, fields: dict[str, str], name: str, data: bytes) -> tuple[int, bytes]:
        """A multipart upload (`file` plus text fields), as the OpenAI client sends audio."""
        boundary = "gemma3n-" + uuid.uuid4().hex
        parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode()
                 for key, value in fields.items()]
        safe = name.replace('"', "_").replace("\r", "_").replace("\n", "_")
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"\r\n'
                     "Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        return await self.post(path, body, f"multipart/form-data; boundary={boundary}")

    @property
    def scheduler(self):
        return self.app.state.scheduler

    def close(self) -> None:
        if self.loop.is_closed():
            return
        try:
            self.submit(self._lifespan.shutdown()).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.loop.close()


async def _call(app, method: str, path: str, body: bytes, headers: list) -> tuple[int, bytes]:
    """One HTTP request through the ASGI interface: the body in one message, then (as a client that waits for
    its answer) a disconnect only once the response is complete."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent, done = False, asyncio.Event()
    status, chunks = 500, []

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return status, b"".join(chunks)


class _Lifespan:
    """The ASGI lifespan protocol (what uvicorn does at start and stop): starts and stops the app's scheduler."""

    def __init__(self, app):
        self.app = app
        self.inbox: asyncio.Queue | None = None
        self.outbox: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None

    async def startup(self) -> None:
        self.inbox, self.outbox = asyncio.Queue(), asyncio.Queue()
        self.task = asyncio.ensure_future(self.app({"type": "lifespan", "asgi": {"version": "3.0"}},
                                                   self.inbox.get, self.outbox.put))
        await self._exchange("startup")

    async def shutdown(self) -> None:
        if self.task is not None and not self.task.done():
            await self._exchange("shutdown")
            await self.task

    async def _exchange(self, phase: str) -> None:
        await self.inbox.put({"type": f"lifespan.{phase}"})
        reply = await self.outbox.get()
        if reply["type"] != f"lifespan.{phase}.complete":
            raise RuntimeError(f"the server app failed to {phase}: {reply.get('message', reply)}")
