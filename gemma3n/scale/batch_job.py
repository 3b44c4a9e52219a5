"""A batch job: its input (a JSONL of requests or a folder of files), its ordered and resumable output, its
progress line, and the local runner (one engine, continuous batching).

Output rows are written in input order, each as soon as it and every row before it are answered, and flushed: an
interrupted job leaves a valid prefix. Rerunning the same command keeps that prefix (checked against the input,
row by row) and answers only the rest. A row answered with an error is finished too: its error is its answer.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .batch_rows import FolderTask, answer_file, answer_line, line_key, output_key, repeated_key
from .engine import Engine, EngineSpec


@dataclass(frozen=True)
class BatchInput:
    """A JSONL of requests (`task` None) or a folder of files (`task` says what to ask of each)."""

    path: Path
    task: FolderTask | None = None

    @property
    def folder(self) -> bool:
        return self.task is not None

    def files(self) -> list[Path]:
        """The folder's files the task takes, in a stable order (sorted relative paths, hidden files left out)."""
        found = [p for p in self.path.rglob("*") if p.is_file() and p.suffix.lower() in self.task.suffixes
                 and not any(part.startswith(".") for part in p.relative_to(self.path).parts)]
        return sorted(found, key=lambda p: p.relative_to(self.path).as_posix())

    def lines(self) -> Iterator[str]:
        """The JSONL's request lines (blank lines are not rows)."""
        with open(self.path, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if line.strip():
                    yield line.rstrip("\r\n")

    def keys(self) -> Iterator:
        if self.folder:
            return (p.relative_to(self.path).as_posix() for p in self.files())
        return (line_key(line) for line in self.lines())

    def count(self) -> int:
        return sum(1 for _ in self.keys())

    def check(self) -> None:
        if self.folder:
            if not self.path.is_dir():
                raise FileNotFoundError(f"{self.path} is not a folder (with --transcribe or --prompt, INPUT is a "
                                        "folder of files)")
            if not self.files():
                kinds = "audio files" if self.task.transcribe else "images"
                raise ValueError(f"{self.path} holds no {kinds} ({', '.join(self.task.suffixes)})")
        elif not self.path.is_file():
            raise FileNotFoundError(f"{self.path} is not a file; INPUT is a JSONL of requests (or a folder with "
                                    "--transcribe / --prompt TEXT)")

    def first_model(self) -> str | None:
        """The model the first well-formed request names (a JSONL meant for another model is caught before
        loading)."""
        if self.folder:
            return None
        for line in self.lines():
            try:
                body = json.loads(line).get("body")
            except (json.JSONDecodeError, AttributeError):
                continue
            if isinstance(body, dict) and isinstance(body.get("model"), str):
                return body["model"]
        return None


class OrderedOutput:
    """The output JSONL: keeps a finished prefix of an earlier run, then writes rows in input order."""

    def __init__(self, path: Path, source: BatchInput, overwrite: bool = False):
        self.path, self.pending = path, {}
        self.done = 0 if overwrite or not path.exists() else self._keep_prefix(source)
        self.next = self.done
        self.file = open(path, "a" if self.done else "w", encoding="utf-8")

    def _keep_prefix(self, source: BatchInput) -> int:
        """How many rows an earlier run finished; a partly written last line is cut off."""
        keep, rows = 0, 0
        with open(self.path, "rb") as f:
            data = f.read()
        keys = source.keys()
        for raw in data.splitlines(keepends=True):
            if not raw.endswith(b"\n"):
                break
            try:
                written = output_key(json.loads(raw), source.folder)
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                break
            expected = next(keys, StopIteration)
            if expected is StopIteration or written != expected:
                raise ValueError(f"{self.path} row {rows + 1} is for {written!r}, but row {rows + 1} of "
                                 f"{source.path} is {None if expected is StopIteration else expected!r}: it holds "
                                 "another job's results; choose another OUTPUT, or --overwrite it")
            keep += len(raw)
            rows += 1
        with open(self.path, "r+b") as f:
            f.truncate(keep)
        return rows

    def put(self, index: int, row: dict) -> int:
        """Record row `index`; write every row now ready in order. Returns how many were written."""
        self.pending[index] = row
        written = 0
        while self.next in self.pending:
            self.file.write(json.dumps(self.pending.pop(self.next), ensure_ascii=False) + "\n")
            self.next += 1
            written += 1
        if written:
            self.file.flush()
        return written

    def close(self) -> None:
        self.file.close()


class Progress:
    """One line on stderr: rows done of the total, rows/s and the time left; redrawn in place on a terminal,
    printed every few seconds otherwise (a log file)."""

    def __init__(self, total: int, done: int = 0, enabled: bool = True, stream=None):
        self.total, self.done, self.enabled = total, done, enabled
        self.stream = stream or sys.stderr
        self.start, self.answered, self.last = time.perf_counter(), 0, 0.0
        self.tty = self.stream.isatty()
        self.errors = 0

    def advance(self, rows: int, errors: int = 0) -> None:
        self.done += rows
        self.answered += rows
        self.errors += errors
        now = time.perf_counter()
        if self.enabled and (now - self.last >= (0.5 if self.tty else 5.0) or self.done == self.total):
            self.last = now
            self.stream.write(("\r" if self.tty else "") + self.line() + ("" if self.tty else "\n"))
            self.stream.flush()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        rate = self.answered / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left is not None else "--:--:--"
        share = 100 * self.done / self.total if self.total else 100
        return (f"gemma3n batch: {self.done}/{self.total} rows ({share:.0f}%), {rate:.2f} rows/s, ETA {eta}, "
                f"{self.errors} errors")

    def finish(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")


async def answer(engine: Engine, source: BatchInput, payload) -> dict:
    """One row of `source` answered by `engine`: `payload` is a JSONL line or a (file name, bytes) pair."""
    if source.folder:
        name, data = payload
        return await answer_file(engine, source.task, name, data)
    return await answer_line(engine, payload)


class UniqueKeys:
    """custom_ids seen so far (those of the finished prefix first): a repeated one is refused, since resuming
    matches rows by it."""

    def __init__(self, source: BatchInput, done: int):
        self.folder = source.folder
        self.seen = set() if self.folder else {k for i, k in zip(range(done), source.keys()) if k is not None}

    def repeats(self, key) -> bool:
        if self.folder or key is None:
            return False
        if key in self.seen:
            return True
        self.seen.add(key)
        return False


def is_error(row: dict) -> bool:
    status = row.get("status_code") if "file" in row else (row.get("response") or {}).get("status_code")
    return status != 200


def run_local(source: BatchInput, output: OrderedOutput, spec: EngineSpec, progress: Progress) -> None:
    """Answer the rows after `output.done` with one engine, a batch and the next one in flight (the batch is full
    and the next rows are decoded and waiting)."""
    engine = Engine.from_spec(spec)
    window = in_flight(spec.settings)
    running: dict[cf.Future, int] = {}
    keys = UniqueKeys(source, output.done)
    try:
        for index, payload in _payloads(source, output.done):
            key = None if source.folder else line_key(payload)
            if keys.repeats(key):
                row = repeated_key(key)
                progress.advance(output.put(index, row), errors=1)
                continue
            running[engine.submit(answer(engine, source, payload))] = index
            if len(running) >= window:
                _collect(running, output, progress, cf.FIRST_COMPLETED)
        while running:
            _collect(running, output, progress, cf.FIRST_COMPLETED)
    finally:
        for future in running:
            future.cancel()
        engine.close()


def in_flight(settings) -> int:
    """Requests to keep in an engine: a full batch and as many waiting, within what its queue accepts."""
    return settings.max_batch + min(settings.max_batch, settings.max_queue)


def _payloads(source: BatchInput, start: int):
    if source.folder:
        for index, path in enumerate(source.files()):
            if index >= start:
                yield index, (path.relative_to(source.path).as_posix(), path.read_bytes())
    else:
        for index, line in enumerate(source.lines()):
            if index >= start:
                yield index, line


def _collect(running: dict, output: OrderedOutput, progress: Progress, when) -> None:
    finished, _ = cf.wait(list(running), return_when=when)
    for future in finished:
        row = future.result()
        progress.advance(output.put(running.pop(future), row), errors=int(is_error(row)))
