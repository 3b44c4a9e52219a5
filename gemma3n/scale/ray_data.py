"""`gemma3n batch --ray`: the batch job as a Ray Data pipeline.

Ray Data's workers read the input (the JSONL with `read_text`, a folder's files with `read_binary_files`), so it
may sit on storage every node sees; `map_batches` hands blocks of rows to a pool of actors, each holding one
gemma3n engine (the server's app in process, continuous batching inside); the answers stream back to the driver
in input order (`preserve_order`), which writes OUTPUT, its progress line and its resumable prefix exactly as the
local runner does. Needs the `ray` extra.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
from pathlib import Path

from .batch_job import BatchInput, OrderedOutput, Progress, UniqueKeys, answer, in_flight, is_error
from .batch_rows import line_key, repeated_key
from .engine import Engine, EngineSpec

SKIPPED, BLANK = "skipped", "blank"  # a row an earlier run finished; a blank line (not a row)


class EngineReplica:
    """One Ray Data actor: one engine; a call answers a block of rows concurrently (they decode together)."""

    def __init__(self, spec: EngineSpec, task, root: str | None, finished: frozenset):
        self.source = BatchInput(Path(root or "."), task)
        self.finished = finished
        self.engine = Engine.from_spec(spec)

    def __call__(self, batch: dict) -> dict:
        kinds, futures = [], []
        if self.source.folder:
            # Ray Data names each file by its path on the filesystem it read (absolute, maybe without the root "/")
            rows = [(Path("/", str(p)).relative_to(self.source.path).as_posix(), bytes(b))
                    for p, b in zip(batch["path"], batch["bytes"])]
        else:
            rows = [str(t).rstrip("\r") for t in batch["text"]]
        for row in rows:
            key = row[0] if self.source.folder else line_key(row)
            if not self.source.folder and not row.strip():
                kinds.append(BLANK)
            elif key is not None and key in self.finished:
                kinds.append(SKIPPED)
            else:
                kinds.append("row")
                futures.append(self.engine.submit(answer(self.engine, self.source, row)))
        cf.wait(futures)
        answers = iter(f.result() for f in futures)
        out = [json.dumps(next(answers), ensure_ascii=False) if k == "row" else "" for k in kinds]
        return {"kind": kinds, "out": out}

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def connect(address: str | None, log_to_driver: bool = False) -> None:
    """Join the Ray cluster at `address` ("auto": the one running here; None: $RAY_ADDRESS, else a new local
    one), unless this process already has."""
    import ray
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=log_to_driver, include_dashboard=False if address is None else None)


def cluster_cpus() -> int:
    import ray
    return int(ray.cluster_resources().get("CPU", 1))


def run_on_ray(source: BatchInput, output: OrderedOutput, spec: EngineSpec, progress: Progress,
               replicas: int) -> None:
    """Answer the rows after `output.done` with `replicas` actors of `spec.threads` CPUs each."""
    import ray
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # answers come back in input order: the output is written as read
    ctx.enable_progress_bars = False  # the job's own progress line says rows, rows/s and ETA
    finished = frozenset(_finished_keys(source, output.done))
    # Reading is light next to generating: it takes no CPU slot, so the actors may hold every core.
    read_args = {"num_cpus": 0}
    if source.folder:
        files = [str(p.resolve()) for p in source.files()[output.done:]]
        if not files:
            return
        dataset = ray.data.read_binary_files(files, include_paths=True, **read_args)
    else:
        dataset = ray.data.read_text(str(source.path), **read_args)
    answered = dataset.map_batches(
        EngineReplica, fn_constructor_kwargs={"spec": spec, "task": source.task,
                                              "root": str(source.path.resolve()) if source.folder else None,
                                              "finished": finished},
        batch_size=spec.settings.max_batch, compute=ray.data.ActorPoolStrategy(size=replicas),
        num_cpus=spec.threads or 1,
        # A second block waits inside the actor (when its queue can hold it), so the engine never idles.
        max_concurrency=2 if in_flight(spec.settings) >= 2 * spec.settings.max_batch else 1)
    try:
        _write(answered, source, output, progress)
    except ray.exceptions.RayError as e:  # an actor could not start (a model path missing on a node, ...)
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise ValueError(f"the Ray job failed: {lines[-1] if lines else type(e).__name__} (the rows answered so "
                         "far are kept; rerun to resume)") from None


def _finished_keys(source: BatchInput, done: int) -> list:
    keys = []
    for i, key in enumerate(source.keys()):
        if i >= done:
            break
        if key is not None:
            keys.append(key)
    return keys


def _write(answered, source: BatchInput, output: OrderedOutput, progress: Progress) -> None:
    """Write the answers in order. The first `output.done` rows (finished earlier) are dropped: the actors
    skipped them, or answered them again when they had no custom_id to match (malformed lines: instant errors).
    A later row the actors skipped repeats a finished row's custom_id, and is refused as the local runner
    refuses it."""
    index, keys = 0, UniqueKeys(source, output.done)
    for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
        for kind, text in zip(batch["kind"], batch["out"]):
            if kind == BLANK:
                continue
            if index >= output.done:
                row = json.loads(str(text)) if kind != SKIPPED else None
                key = None if source.folder else (row["custom_id"] if row else _key_at(source, index))
                if keys.repeats(key) or row is None:
                    row = repeated_key(key)
                progress.advance(output.put(index, row), errors=int(is_error(row)))
            index += 1


def _key_at(source: BatchInput, index: int):
    return next(k for i, k in enumerate(source.keys()) if i == index)
