"""The tensors of a MatFormer slice, read from the unsliced checkpoint's memory maps: the same mapping serves the
elastic load (`gemma3n.load(path, matformer=...)`) and the offline writer (`slice_checkpoint`).

For each tensor of the slice, only the kept part of the source is ever read:
- layers: the kept layers, renumbered; `gate_proj` / `up_proj` keep their first w rows (a view of the map, no
  copy), `down_proj` its first w columns (copied once into a contiguous tensor, then the source's pages are
  dropped from the process);
- `embed_tokens_per_layer` [V, L*P] keeps the kept layers' column blocks: at load time it stays in the file and a
  lookup gathers those blocks of the token's row (`SlicedRowEmbedding`); written, it streams a block of rows at a
  time;
- `per_layer_model_projection` [L*P, H] keeps the kept layers' row blocks;
- everything else (towers and their embedders, norms, AltUp, LAuReL, the token embedding) as stored.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from ..checkpoint.safetensors import Checkpoint, CheckpointError
from ..checkpoint.weights import TOWER_PREFIXES, text_key_map
from .plan import SlicePlan

_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")
_CHUNK_BYTES = 64 << 20  # rows produced at a time when writing


class SlicedTensors(Mapping[str, Tensor]):
    """The slice's tensors by name (the names the sliced checkpoint has), lazily from the source checkpoint."""

    def __init__(self, base: Checkpoint, plan: SlicePlan):
        self.base, self.plan = base, plan
        src = plan.source
        names = list(base)
        self.prefix = text_key_map(names, src.first_shared_layer).prefix
        p = src.hidden_size_per_layer_input
        n, index = src.num_hidden_layers, plan.new_index()
        self._src: dict[str, tuple[str, str, int]] = {}  # new name -> (source name, kind, width)
        self._shapes: dict[str, tuple[int, ...]] = {}
        for name in names:
            shape = base.shape(name)
            if name.startswith(TOWER_PREFIXES) or name == "lm_head.weight" or not name.startswith(self.prefix):
                self._add(name, name, "copy", 0, shape)
                continue
            rest = name[len(self.prefix):]
            layer = _LAYER.match(rest)
            if layer:
                old = int(layer.group(1))
                if old >= n:
                    raise CheckpointError(f"{base.file_of(name)}: tensor '{name}' is for layer {old}, but config.json "
                                          f"has {n} layers")
                if old not in index:
                    continue  # a skipped layer
                new_name = f"{self.prefix}layers.{index[old]}.{layer.group(2)}"
                width, full = plan.widths[index[old]], src.intermediate_size[old]
                part = layer.group(2)
                if part in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                    self._check(name, shape, 0, full, f"intermediate_size[{old}] = {full}")
                    self._add(new_name, name, "rows", width, (width, *shape[1:]))
                elif part == "mlp.down_proj.weight":
                    self._check(name, shape, 1, full, f"intermediate_size[{old}] = {full}")
                    self._add(new_name, name, "cols", width, (shape[0], width))
                else:
                    self._add(new_name, name, "copy", 0, shape)
            elif rest == "embed_tokens_per_layer.weight":
                self._check(name, shape, 1, n * p, f"{n} layers x {p}")
                self._add(name, name, "ple", 0, (shape[0], len(plan.kept) * p))
            elif rest == "per_layer_model_projection.weight":
                self._check(name, shape, 0, n * p, f"{n} layers x {p}")
                self._add(name, name, "proj", 0, (len(plan.kept) * p, shape[1]))
            else:
                self._add(name, name, "copy", 0, shape)

    def _add(self, new: str, old: str, kind: str, width: int, shape) -> None:
        self._src[new] = (old, kind, width)
        self._shapes[new] = tuple(shape)

    def _check(self, name: str, shape, dim: int, expected: int, what: str) -> None:
        if len(shape) != 2 or shape[dim] != expected:
            raise CheckpointError(f"{self.base.file_of(name)}: tensor '{name}' has shape {tuple(shape)}, but "
                                  f"config.json implies {expected} along dimension {dim} ({what})")

    # -- Mapping ---------------------------------------------------------------------------------------------------

    def __getitem__(self, name: str) -> Tensor:
        old, kind, width = self._src[name]
        t = self.base[old]
        if kind == "copy":
            return t
        if kind == "rows":
            return t if width == t.shape[0] else t[:width]
        if kind == "cols":
            if width == t.shape[1]:
                return t
            out = t[:, :width].contiguous()
            self.base.release(old)  # the source rows were read for the copy; drop them from the process
            return out
        pieces = self._pieces(old, kind, t)
        return pieces[0] if len(pieces) == 1 and pieces[0].is_contiguous() else torch.cat(pieces, 1 - (kind == "proj"))

    def __contains__(self, name) -> bool:  # (Mapping's would produce the tensor: the per-layer table is GBs)
        return name in self._src

    def __iter__(self) -> Iterator[str]:
        return iter(self._src)

    def __len__(self) -> int:
        return len(self._src)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self.base[self._src[name][0]].dtype

    def release(self, name: str) -> None:
        self.base.release(self._src[name][0])

    def file_of(self, name: str) -> Path:
        return self.base.file_of(self._src[name][0])

    def source_name(self, name: str) -> str:
        return self._src[name][0]

    # -- the per-layer table and projection ------------------------------------------------------------------------

    def _pieces(self, old: str, kind: str, t: Tensor) -> list[Tensor]:
        p = self.plan.source.hidden_size_per_layer_input
        if kind == "ple":  # [V, L*P]: column blocks
            return [t[:, a * p:b * p] for a, b in self.plan.runs()]
        return [t[a * p:b * p] for a, b in self.plan.runs()]  # [L*P, H]: row blocks

    def row_table(self, name: str) -> "SlicedRowEmbedding | None":
        """The per-layer table as a module that reads the kept blocks of each looked-up row from the file; None when
        the stored table itself is the slice's (nothing to select)."""
        old, kind, _ = self._src[name]
        t = self.base[old]
        pieces = self._pieces(old, kind, t)
        if len(pieces) == 1 and pieces[0].is_contiguous():
            return None
        return SlicedRowEmbedding(pieces, t)

    def chunks(self, name: str) -> Iterator[Tensor]:
        """The tensor as blocks of rows (each contiguous), for writing; the source's pages are dropped from the
        process as they are done, so a table larger than memory streams through."""
        old, kind, width = self._src[name]
        t = self.base[old]
        if t.dim() < 2 or kind == "proj":
            yield self[name].contiguous()
            self.base.release(old)
            return
        row_bytes = t[0].numel() * t.element_size()
        step = max(1, _CHUNK_BYTES // max(1, row_bytes))
        pieces = self._pieces(old, kind, t) if kind == "ple" else None
        for start in range(0, t.shape[0], step):
            stop = min(t.shape[0], start + step)
            if kind == "copy":
                block = t[start:stop]
            elif kind == "rows":
                if start >= width:
                    break
                stop = min(stop, width)
                block = t[start:stop]
            elif kind == "cols":
                block = t[start:stop, :width]
            else:
                block = torch.cat([piece[start:stop] for piece in pieces], 1)
            yield block.contiguous()
            self.base.release(old, start * row_bytes, stop * row_bytes)


class SlicedRowEmbedding(nn.Module):
    """The per-layer embedding table of an elastic slice: the stored [V, L*P] table stays in the file and a lookup
    reads, for each token, only the kept layers' blocks of its row (strided views of the map), in the stored dtype
    (the model converts the rows it gets, as it does for the unsliced table)."""

    def __init__(self, pieces: list[Tensor], source: Tensor):
        super().__init__()
        self.pieces = pieces
        self.source = source  # the whole stored table, for the read-ahead (loading.prefetch_per_layer_table)
        self.num_embeddings = source.shape[0]
        self.embedding_dim = sum(p.shape[1] for p in pieces)

    def forward(self, ids: Tensor) -> Tensor:
        # index_select gathers the rows of a strided view where they lie; F.embedding would first copy the whole
        # (multi-GB) view into a contiguous tensor on every call
        flat = ids.reshape(-1).cpu()
        rows = torch.cat([piece.index_select(0, flat) for piece in self.pieces], -1)
        return rows.reshape(*ids.shape, self.embedding_dim).to(ids.device)
