"""Decode-time K/V of rows that joined a running batch at different times (continuous batching, engine/batch.py).

Every row owns its keys from column 0 and has its own length; a decode step feeds one token per row, each at its
own position. Rows are prefilled with an ordinary `KVCache` and then `add`ed here.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..config import SLIDING
from .cache import KVCache, Step


class BatchCache:
    """Decode-time K/V of rows with independent lengths; the model's cache interface for one new token per row.

    Global slots are (B, H, capacity, D) with row b's keys in columns [0, length_b); sliding slots are rings of
    `ring` cells where cell c holds the row's latest index congruent to c (mod ring), as `KVCache` lays them out.
    """

    def __init__(self, slot_types: list[str], ring: int | None):
        self.slot_types, self.ring = list(slot_types), ring
        self.keys: list[Tensor | None] = [None] * len(slot_types)
        self.values: list[Tensor | None] = [None] * len(slot_types)
        self.lengths = torch.zeros(0, dtype=torch.long)
        self.capacities: list[int] = []  # per row: prompt + new-token budget
        self._write: Tensor | None = None  # per row: the cell the current step writes
        self._keys_seen = 0  # global keys the current step attends to

    @property
    def batch(self) -> int:
        return len(self.capacities)

    # -- rows joining and leaving ----------------------------------------------------------------------------------

    def add(self, prefilled: KVCache) -> int:
        """Append the one-row `prefilled` cache (after its prompt) as a new row; returns the row's index."""
        if prefilled.batch != 1:
            raise ValueError(f"BatchCache.add takes a one-row cache, got {prefilled.batch} rows")
        length, capacity = prefilled.length, prefilled.max_len
        width = max([capacity] + self.capacities)
        for i, slot in enumerate(prefilled.slots):
            k, v = self._as_row(i, slot.k, length, width), self._as_row(i, slot.v, length, width)
            self.keys[i] = k if self.keys[i] is None else torch.cat((self._widen(self.keys[i], i, width), k))
            self.values[i] = v if self.values[i] is None else torch.cat((self._widen(self.values[i], i, width), v))
        self.lengths = torch.cat((self.lengths.to(prefilled.valid.device), torch.tensor([length],
                                                                                       device=prefilled.valid.device)))
        self.capacities.append(capacity)
        return self.batch - 1

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order); the others' memory is released."""
        if not rows:
            self.keys = [None] * len(self.slot_types)
            self.values = [None] * len(self.slot_types)
            self.lengths, self.capacities = self.lengths[:0], []
            return
        index = torch.tensor(rows, device=self.lengths.device)
        self.capacities = [self.capacities[r] for r in rows]
        width = max(self.capacities)
        for i, kind in enumerate(self.slot_types):
            cols = self.keys[i].shape[2] if kind == SLIDING else width  # shrink global slots to the widest row
            self.keys[i] = self.keys[i][:, :, :cols].index_select(0, index)
            self.values[i] = self.values[i][:, :, :cols].index_select(0, index)
        self.lengths = self.lengths.index_select(0, index)

    def row_kv(self, row: int) -> tuple[int, list[tuple[Tensor, Tensor]]]:
        """(length, per slot (1, H, n, D) keys and values of `row` in sequence order): global slots all `length`
        positions, sliding slots the last min(length, ring) (what the ring still holds). Copies."""
        length = int(self.lengths[row])
        out = []
        for i, kind in enumerate(self.slot_types):
            k, v = self.keys[i][row:row + 1], self.values[i][row:row + 1]
            if kind == SLIDING:
                cells = torch.arange(max(0, length - self.ring), length, device=k.device) % self.ring
                out.append((k[:, :, cells], v[:, :, cells]))  # advanced indexing copies
            else:
                out.append((k[:, :, :length].clone(), v[:, :, :length].clone()))
        return length, out

    def _as_row(self, slot: int, src: Tensor, length: int, width: int) -> Tensor:
        """One prefilled slot (1, H, C, D) -> this cache's layout for that slot."""
        if self.slot_types[slot] != SLIDING:
            row = src.new_zeros(src.shape[0], src.shape[1], width, src.shape[3])
            row[:, :, :length] = src[:, :, :length]
            return row
        ring, kept = self.ring, src.shape[2]  # the prefill ring may be smaller (short prompt + budget)
        row = src.new_zeros(src.shape[0], src.shape[1], ring, src.shape[3])
        index = torch.arange(max(0, length - kept), length, device=src.device)
        row[:, :, index % ring] = src[:, :, index % kept]
        return row

    def _widen(self, t: Tensor, slot: int, width: int) -> Tensor:
        if self.slot_types[slot] == SLIDING or t.shape[2] >= width:
            return t
        return torch.nn.functional.pad(t, (0, 0, 0, width - t.shape[2]))

    # -- what native code reads ------------------------------------------------------------------------------------

    def slot_tensors(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) of every slot: global (B, H, width, D), sliding (B, H, ring, D)."""
        return list(zip(self.keys, self.values))

    def write_cells(self) -> tuple[list[int], list[int]]:
        """(sliding, global), per row: the cell its new K/V goes to in the current step, as `update` writes it.
        Call after `start`."""
        write = self._write.tolist()
        return [cell % (self.ring or 1) for cell in write], write

    # -- the model's cache interface -------------------------------------------------------------------------------

    def start(self, attention_mask: Tensor | None, new_tokens: int) -> Step:
        """One decode column for every row: positions are the rows' lengths, masks their own keys."""
        if new_tokens != 1 or (attention_mask is not None and not bool(attention_mask.all())):
            raise ValueError("BatchCache decodes one real token per row; prefill with a KVCache and add() it")
        n = self.lengths
        if bool((n >= torch.tensor(self.capacities, device=n.device)).any()):
            raise ValueError("a row of the batch has no room left; drop it before the next step")
        self._keys_seen = int(n.max()) + 1
        masks = {}
        for kind in set(self.slot_types):
            if kind == SLIDING:
                cells = torch.arange(self.ring, device=n.device)
                held = n[:, None] - torch.remainder(n[:, None] - cells, self.ring)  # index in each cell after the write
                masks[kind] = (held >= 0)[:, None, None, :]
            else:
                masks[kind] = (torch.arange(self._keys_seen, device=n.device)[None] <= n[:, None])[:, None, None, :]
        self._write = n
        self.lengths = n + 1
        return Step(positions=n[:, None].clone(), masks=masks, new_tokens=1)

    def update(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write each row's new K/V (B, H, 1, D) at its own cell; return the keys and values the step attends to."""
        rows = torch.arange(self.batch, device=k.device)
        sliding = self.slot_types[slot] == SLIDING
        cells = torch.remainder(self._write, self.ring) if sliding else self._write
        self.keys[slot][rows, :, cells] = k[:, :, 0]
        self.values[slot][rows, :, cells] = v[:, :, 0]
        if sliding:
            return self.keys[slot], self.values[slot]
        return self.keys[slot][:, :, :self._keys_seen], self.values[slot][:, :, :self._keys_seen]
