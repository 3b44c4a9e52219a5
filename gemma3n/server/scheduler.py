"""One thread owns the model: requests queue first-come, first-served, and decode together.

Requests join a `ContinuousBatch` at step boundaries: each step feeds at most one prefill chunk (the oldest waiting
prompt) and one decode column for every running request, so a long prompt delays the others by one chunk at most.
A request with images or audio first runs the model's media towers (at admission, here, since this thread owns the
model), then joins the batch like any other with its merged prompt embeddings. A cancelled request (client gone)
leaves at the next step and its cache is freed.

The HTTP side talks to this thread only through `Job`s: it submits them, and reads their events from an asyncio
queue that this thread fills with `loop.call_soon_threadsafe`.
"""
from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.batch import ContinuousBatch, Sequence
from ..engine.generate import TextStream
from ..engine.inputs import DEFAULT_CHUNK
from ..engine.heap import limit_arenas, return_freed_heap
from ..engine.prefix_cache import MiB, PrefixCache
from ..engine.sampling import SamplingParams
from .metrics import Metrics
from .errors import APIError

log = logging.getLogger("gemma3n.server")

# What a model raises for a request it cannot serve (too long, media it cannot take): the client's fault, a 400.
REQUEST_ERRORS = (ValueError, TypeError, NotImplementedError)


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    logprobs: list | None = None  # engine.batch.TokenLogprob per new token, when the request asked for them
    prompt_logprobs: list | None = None  # per prompt token after the first (completions' echo)
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache


class Job:
    """One request: prompt ids (plus the processor's media tensors), its sampling, and the events it produces:
    ("started", prompt_tokens), ("text", piece)..., then ("done", Result) or ("error", APIError). A job that asked
    for logprobs also gets ("logprobs", [TokenLogprob...]) before the text of those tokens (and after the last text,
    for tokens whose text a stop string held back).

    `cache_key`: anything besides the ids that changes the prompt's K/V: prompts are only resumed from the prefix
    cache under the same key. `request_id` names the request in the server's log. `adapter`: the LoRA adapter it
    is generated with (None: the base model); the batch keeps each adapter's prefix cache entries apart."""

    def __init__(self, params: SamplingParams, ids: torch.Tensor, media: dict | None = None, cache_key=None,
                 request_id: str | None = None, adapter: str | None = None):
        self.params, self.ids, self.media = params, ids, media or {}
        self.cache_key, self.request_id, self.adapter = cache_key, request_id, adapter
        self.sent_logprobs = 0  # logprob entries emitted (scheduler thread only)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.started = False  # "started" was emitted (scheduler thread only)
        self.watcher: asyncio.Future | None = None  # the HTTP side's wait for the client's disconnect

    def emit(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody is listening
            self.cancelled.set()


class Scheduler:
    def __init__(self, model, max_batch: int = 32, max_queue: int = 256, chunk_size: int = DEFAULT_CHUNK,
                 prefix_cache_mb: int = 0):
        self.model, self.max_batch, self.max_queue, self.chunk_size = model, max_batch, max_queue, chunk_size
        self.prefix_cache = PrefixCache(prefix_cache_mb * MiB)
        self.batch = ContinuousBatch(model.decoder, chunk_size, prefix_cache=self.prefix_cache,
                                     adapters=getattr(model, "adapters", None))
        self.stop_ids = model.stop_ids()
        self.inbox: collections.deque[list[Job]] = collections.deque()  # the n choices of a request together
        self.wakeup = threading.Condition()
        self.running: dict[Sequence, tuple[Job, TextStream]] = {}
        self.steps = 0  # batch steps run
        self.peak_batch = 0  # most sequences decoded in one step
        self.metrics = Metrics()
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name="gemma3n-scheduler", daemon=True)
        limit_arenas(2)  # the event loop, this thread and the worker pool would each fragment an arena of its own

    # -- HTTP side -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wakeup:
            self._stopping = True
            self.wakeup.notify()
        self.thread.join(timeout=30)

    def submit(self, job: Job, *siblings: Job) -> None:
        """Queue a request; `siblings` are more choices of the same prompt (`n`), prefilled once with it."""
        with self.wakeup:
            if len(self.inbox) >= self.max_queue:
                raise APIError(429, f"the server is busy ({len(self.inbox)} requests waiting); retry later")
            self.inbox.append([job, *siblings])
            self.wakeup.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self.wakeup:
            self.wakeup.notify()

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def waiting(self) -> int:
        return len(self.inbox)

    # -- the model thread ------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.wakeup:
                while not self._stopping and not self.inbox and not self.active:
                    self.wakeup.wait()
                if self._stopping:
                    return
            self._admit()
            self._drop_cancelled()
            try:
                self._step_batch()
            except Exception:  # a bug or out of memory: fail what is running, keep serving the next requests
                log.exception("generation failed")
                self._fail_all("internal error while generating; see the server log")
            if not len(self.batch) and not self.inbox:
                # Idle: the burst's K/V copies, logits and prompt tensors are freed; give their pages back, or the
                # resident set would ratchet up from one burst of requests to the next.
                return_freed_heap()

    def _admit(self) -> None:
        while self.active < self.max_batch:
            with self.wakeup:
                if not self.inbox:
                    return
                jobs = [j for j in self.inbox.popleft() if not j.cancelled.is_set()]
            if not jobs:
                continue
            job = jobs[0]
            try:
                embeds = self.model.embed_media(job.ids, **job.media) if job.media else None  # the media towers
                key = job.cache_key if embeds is None else (job.cache_key, media_digest(job.media))
                seq = self.batch.add(job.ids, job.params, self.stop_ids, inputs_embeds=embeds, cache_key=key,
                                     siblings=[j.params for j in jobs[1:]], adapter=job.adapter)
                for each, member in zip(jobs, [seq] + seq.siblings):
                    self.running[member] = (each, TextStream(self.model.tokenizer, each.params.stop))
            except REQUEST_ERRORS as e:
                for each in jobs:
                    self.metrics.refused()
                    each.emit("error", APIError(400, str(e)))
            except ImportError as e:  # a media tower this build does not have yet
                for each in jobs:
                    each.emit("error", APIError(400, f"this build of gemma3n cannot read this media yet ({e})",
                                                code="unsupported_media"))

    def _drop_cancelled(self) -> None:
        for seq, (job, _) in list(self.running.items()):
            if job.cancelled.is_set():
                self.batch.finish(seq, "cancelled")
                del self.running[seq]
                self.metrics.finished("cancelled", seq.prompt_tokens, seq.sampled, seq.prefill_seconds or None,
                                      seq.decode_seconds)

    def _step_batch(self) -> None:
        if not len(self.batch):
            return
        self.peak_batch = max(self.peak_batch, len(self.batch.decoding))
        for seq, token in self.batch.step():
            if seq in self.running:
                self._deliver(seq, token)
        self.steps += 1

    def _deliver(self, seq: Sequence, token: int | None) -> None:
        job, stream = self.running[seq]
        if not job.started:
            job.started = True
            job.emit("started", seq.prompt_tokens)
        if token is not None:
            piece = stream.push(token)
            if stream.stopped:
                self.batch.finish(seq, "stop")
            if piece:
                self._emit_logprobs(job, seq)
                job.emit("text", piece)
        if seq.done:
            del self.running[seq]  # before "done": a client that has its answer sees the server idle
            tail = stream.finish()
            self._emit_logprobs(job, seq)
            if tail:
                job.emit("text", tail)
            log.info("request %s: %s, %d prompt tokens (%d cached), %d new, first token after %.3f s",
                     job.request_id or "-", seq.finish_reason, seq.prompt_tokens, seq.cached_tokens, seq.sampled,
                     seq.prefill_seconds)
            self.metrics.finished(seq.finish_reason, seq.prompt_tokens, seq.sampled,
                                  seq.prefill_seconds or None, seq.decode_seconds)
            asked = job.params.logprobs is not None
            job.emit("done", Result(stream.text, seq.prompt_tokens, seq.sampled, seq.finish_reason,
                                    seq.logprobs if asked else None,
                                    seq.prompt_logprobs if job.params.prompt_logprobs else None, seq.cached_tokens))

    @staticmethod
    def _emit_logprobs(job: Job, seq: Sequence) -> None:
        if job.params.logprobs is not None and len(seq.logprobs) > job.sent_logprobs:
            job.emit("logprobs", seq.logprobs[job.sent_logprobs:])
            job.sent_logprobs = len(seq.logprobs)

    def _fail_all(self, message: str) -> None:
        for job, _ in self.running.values():
            self.metrics.refused()
            job.emit("error", APIError(500, message))
        self.running = {}
        self.batch = ContinuousBatch(self.model.decoder, self.chunk_size, prefix_cache=self.prefix_cache,
                                     adapters=getattr(self.model, "adapters", None))


def media_digest(media: dict) -> str:
    """A digest of a request's media tensors (the processor's output): two prompts with the same ids share K/V only
    when their images and audio are the same."""
    h = hashlib.sha256()
    for name in sorted(media):
        value = media[name]
        if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{name}:{value.dtype}:{tuple(media[name].shape)}".encode())
            h.update(value.view(torch.uint8).numpy().tobytes())
        elif value is not None:
            h.update(f"{name}:{value!r}".encode())
    return h.hexdigest()

