"""Streaming safetensors writer: tensors are produced and written one at a time, so writing a checkpoint never
holds more than one tensor in memory (a 5 B-parameter checkpoint can be written on a machine with little RAM)."""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .safetensors import INDEX_NAME, SINGLE_NAME

_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8",
          torch.uint8: "U8", torch.int32: "I32", torch.int64: "I64"}
# A tensor to write: (name, shape, dtype, produce) where produce() returns it (called once, when it is written).
Entry = tuple[str, tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]


def write_file(path: Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> None:
    """One .safetensors file; the header is computed from the declared shapes before any tensor is produced."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, shape, dtype, _ in entries:
        size = dtype.itemsize
        for dim in shape:
            size *= dim
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype, produce in entries:
            produced = produce()
            # a large tensor may come as an iterator of row chunks, so it never exists whole in memory
            chunks = [produced] if isinstance(produced, torch.Tensor) else produced
            written = 0
            for chunk in chunks:
                if chunk.dtype != dtype:
                    raise ValueError(f"{path}: tensor '{name}' came out {chunk.dtype}, declared {dtype}")
                if chunk.numel():
                    f.write(chunk.contiguous().view(torch.uint8).reshape(-1).numpy().data)
                written += chunk.numel()
            if written != _count(shape):
                raise ValueError(f"{path}: tensor '{name}' produced {written} values, declared {tuple(shape)}")


def write_checkpoint(folder: Path, entries: Iterable[Entry], shard_bytes: int = 2 << 30) -> list[Path]:
    """Entries split into shards of about `shard_bytes`, with an index when there is more than one shard."""
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry[2].itemsize * _count(entry[1])
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_file(folder / SINGLE_NAME, shards[0], {"format": "pt"})
        return [folder / SINGLE_NAME]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        write_file(folder / name, shard, {"format": "pt"})
        weight_map.update({entry[0]: name for entry in shard})
    total = sum(e[2].itemsize * _count(e[1]) for shard in shards for e in shard)
    (folder / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    return [folder / n for n in names]


def _count(shape) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


@contextmanager
def new_folder(dst: Path) -> Iterator[Path]:
    """A hidden sibling folder to write a checkpoint into, renamed to `dst` (absent or empty) when the block ends.

    A failure inside the block (a bad tensor, a full disk, Ctrl-C) removes it, so no half-written checkpoint is
    ever left at `dst` for a later load to take for a whole one."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield work
        if dst.exists():
            dst.rmdir()
        work.rename(dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
