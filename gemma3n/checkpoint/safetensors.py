"""Memory-mapped reading of Hugging Face safetensors checkpoints (single file or sharded).

Tensors are views of a private (copy-on-write) memory map of each file: nothing is read until a page is touched,
and a tensor kept in its stored dtype costs no RAM beyond the page cache. The format is parsed here (an 8-byte
header length, a JSON header, raw little-endian data) so that every inconsistency in a truncated or corrupt file
becomes one clear error naming the file and tensor, before any tensor is used.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator, Mapping

import torch

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file or folder that cannot be loaded as it is."""


class SafetensorsFile:
    """One .safetensors file: validated header, tensors as zero-copy views of a memory map."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = self.path.stat().st_size
                self.entries, self._data_start = self._read_header(f, size)
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read ({e.strerror or e})") from None

    def _read_header(self, f, size: int) -> tuple[dict, int]:
        if size < 8:
            raise CheckpointError(f"{self.path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.path}: corrupt or truncated safetensors header (claims {n} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path}: corrupt safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        data_size = size - 8 - n
        for name, entry in header.items():
            self._check_entry(name, entry, data_size)
        return header, 8 + n

    def _check_entry(self, name: str, entry, data_size: int) -> None:
        where = f"{self.path}: tensor '{name}'"
        if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
            raise CheckpointError(f"{where} has an unsupported or missing dtype ({entry!r:.80})")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not (isinstance(shape, list) and isinstance(offsets, list) and len(offsets) == 2):
            raise CheckpointError(f"{where} has a malformed header entry")
        begin, end = offsets
        count = 1
        for dim in shape:
            count *= dim
        if end > data_size:
            raise CheckpointError(f"{where} lies beyond the end of the file: the file is truncated "
                                  f"({data_size} data bytes, tensor ends at {end}); download it again")
        if end - begin != count * _DTYPES[entry["dtype"]].itemsize or begin < 0:
            raise CheckpointError(f"{where}: byte range {begin}..{end} does not match shape {shape}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        """A view of the stored tensor (no copy). Writing to it never reaches the file (private mapping)."""
        entry = self.entries[name]
        dtype, shape = _DTYPES[entry["dtype"]], entry["shape"]
        begin, end = entry["data_offsets"]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        return flat.view(dtype).view(shape)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        """Drop the tensor's pages from this process's memory (they are re-read from the file if touched again).

        For a weight that has been converted (quantised) and is no longer used: its file pages would otherwise
        stay in the resident set. Safe because the mapping is private and never written: a dropped page comes
        back with the file's contents, also for the neighbouring tensors sharing the edge pages. `start` / `stop`
        (bytes from the tensor's first byte) release a part only: a large table streamed a block at a time."""
        begin, end = self.entries[name]["data_offsets"]
        begin, end = begin + max(0, start), end if stop is None else min(end, begin + stop)
        if end <= begin or not hasattr(self._map, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = (self._data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, self._data_start + end - start)


class Checkpoint(Mapping[str, torch.Tensor]):
    """All tensors of a checkpoint folder (sharded or not), by name, lazily from memory maps."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._file_of: dict[str, SafetensorsFile] = {}
        for file in self._files():
            for name in file.keys():
                self._file_of[name] = file

    def _files(self) -> list[SafetensorsFile]:
        index = self.folder / INDEX_NAME
        if index.exists():
            return self._sharded(index)
        single = self.folder / SINGLE_NAME
        if single.exists():
            return [SafetensorsFile(single)]
        found = sorted(self.folder.glob("*.safetensors"))
        if not found:
            raise CheckpointError(f"{self.folder}: no .safetensors weights found (expected {SINGLE_NAME} "
                                  f"or {INDEX_NAME} with its shards)")
        return [SafetensorsFile(p) for p in found]

    def _sharded(self, index: Path) -> list[SafetensorsFile]:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
        files = {}
        for name, shard in weight_map.items():
            if shard not in files:
                files[shard] = SafetensorsFile(self.folder / shard)
            if name not in files[shard].entries:
                raise CheckpointError(f"{self.folder / shard}: tensor '{name}' listed in {INDEX_NAME} is missing")
        return list(files.values())

    def __contains__(self, name) -> bool:  # (Mapping's would read the tensor)
        return name in self._file_of

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._file_of[name].tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file_of[name].shape(name)

    def release(self, name: str, start: int = 0, stop: int | None = None) -> None:
        self._file_of[name].release(name, start, stop)

    def file_of(self, name: str) -> Path:
        return self._file_of[name].path

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)
