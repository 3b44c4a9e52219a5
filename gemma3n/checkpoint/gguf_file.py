"""One parse of a GGUF file: its key/value metadata and its tensor directory, over one memory map.

The model config, the tensors and the tokenizer of a .gguf all come from the same `GGUFFile`, so loading parses the
file once. Parsed here rather than with `gguf.GGUFReader`, which builds a numpy view per metadata string (seconds on
a 262k-token vocabulary); values come out as plain Python (str, int, float, bool, lists of them), tensors as numpy
views of the map in `gguf.GGUFReader`'s layout (float types by element, quantised types as bytes per row).
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_ELEMENT_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                  GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
                  GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
                  GGMLQuantizationType.I64: np.int64}


class GGUFFormatError(ValueError):
    """Not a GGUF file, or a damaged one; the message names the file."""


@dataclass
class GGUFTensorInfo:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray        # GGUF order: fastest-varying dimension first
    n_elements: int
    data: np.ndarray         # a view of the map: elements (float / int types) or bytes per row (quantised types)


class GGUFFile:
    """`metadata` (dict) and `tensors` (list of GGUFTensorInfo, file order) of `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        with open(self.path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < 24:
                raise GGUFFormatError(f"{self.path} is too short to be a GGUF file")
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                directory = self._parse(buf)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors = [self._tensor(*entry) for entry in directory]

    def _parse(self, buf: mmap.mmap) -> list[tuple]:
        if buf[:4] != b"GGUF":
            raise GGUFFormatError(f"{self.path} is not a GGUF file (it does not start with the 'GGUF' magic bytes)")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            if struct.unpack_from(">I", buf, 4)[0] in (2, 3):
                raise GGUFFormatError(f"{self.path}: big-endian GGUF files are not supported; convert without "
                                      "--bigendian")
            raise GGUFFormatError(f"{self.path} is GGUF version {version}; versions 2 and 3 are supported")
        try:
            self.metadata, pos = read_metadata(buf, kv_count)
            directory = []
            for _ in range(tensor_count):
                name, pos = _read_str(buf, pos)
                (n_dims,) = struct.unpack_from("<I", buf, pos)
                dims = np.array(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4), dtype=np.uint64)
                pos += 4 + 8 * n_dims
                kind, offset = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                directory.append((name, GGMLQuantizationType(kind), dims, offset))
        except (struct.error, UnicodeDecodeError, ValueError, OverflowError, MemoryError) as exc:
            raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF file ({exc})") from None
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"{self.path}: general.alignment {alignment!r} is not a power of two")
        self.data_start = pos + (-pos % alignment)
        names = [entry[0] for entry in directory]
        if len(set(names)) != len(names):
            raise GGUFFormatError(f"{self.path}: a tensor name appears twice")
        return directory

    def _tensor(self, name: str, kind: GGMLQuantizationType, dims: np.ndarray, offset: int) -> GGUFTensorInfo:
        n = int(np.prod(dims)) if len(dims) else 1
        block, type_size = GGML_QUANT_SIZES[kind]
        start = self.data_start + int(offset)
        shape = tuple(int(d) for d in reversed(dims.tolist()))
        element = _ELEMENT_TYPES.get(kind)
        if element is not None:
            size = n * np.dtype(element).itemsize
        else:
            size = n * type_size // block
            shape = shape[:-1] + (shape[-1] // block * type_size,)
            element = np.uint8
        if start + size > self._map.size:
            raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF file: tensor '{name}' runs past its end")
        data = self._map[start:start + size].view(np.ndarray).view(element).reshape(shape)
        return GGUFTensorInfo(name, kind, dims, n, data)


def read_metadata(buf, count: int, pos: int = 24) -> tuple[dict[str, Any], int]:
    """`count` key/value pairs from `pos` (24: just after the header) -> (metadata, position after them)."""
    meta = {}
    for _ in range(count):
        key, pos = _read_str(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        meta[key], pos = _read_value(buf, pos + 4, kind)
    return meta, pos


def _read_str(buf, pos: int) -> tuple[str, int]:
    (size,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + size
    if end > len(buf):
        raise ValueError("string runs past the end of the file")
    return bytes(buf[pos + 8:end]).decode("utf-8"), end


def _read_value(buf, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALAR:
        fmt = "<" + _SCALAR[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _read_str(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown value type {kind}")
    item_kind, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item_kind in _SCALAR:  # one struct call for the whole array (scores, token types)
        fmt = f"<{count}{_SCALAR[item_kind]}"
        return list(struct.unpack_from(fmt, buf, pos)), pos + struct.calcsize(fmt)
    items = []
    for _ in range(count):
        item, pos = _read_value(buf, pos, item_kind)
        items.append(item)
    return items, pos
