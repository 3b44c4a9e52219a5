"""Preallocated KV cache and the per-step attention bookkeeping (positions, masks) shared by all layers.

One slot per layer that computes its own K/V. Global slots hold the whole context; sliding slots are ring buffers
of `window` entries. Layers that share K/V own no slot: they attend with the K/V their producer returned in the
same forward pass. Sequence *indices* count every column including left padding (they place keys in the buffers
and define the sliding window, as in the reference); *positions* count only real tokens (they feed RoPE), so a
left-padded row computes exactly what the same sequence computes alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import SLIDING


@dataclass
class Step:
    """What every layer needs for one forward call: RoPE positions and a boolean mask per attention type."""

    positions: Tensor  # (B, T) int64, real-token positions
    masks: dict[str, Tensor]  # type -> (B, 1, T, Tk) bool, True = may attend
    new_tokens: int


class _Slot:
    """K/V storage of one layer: (B, H, capacity, D) for keys and values."""

    def __init__(self, batch: int, heads: int, capacity: int, head_dim: int, dtype: torch.dtype, device):
        shape = (batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)


class KVCache:
    """The cache of one batch of sequences being generated together."""

    def __init__(self, slot_types: list[str], batch: int, max_len: int, kv_heads: int, head_dim: int,
                 window: int | None, dtype: torch.dtype, device="cpu"):
        self.slot_types, self.batch, self.max_len = list(slot_types), batch, max_len
        self.window = window
        ring = min(window, max_len) if window else max_len
        self.slots = [
            _Slot(batch, kv_heads, ring if t == SLIDING else max_len, head_dim, dtype, device) for t in slot_types
        ]
        self.length = 0  # sequence indices written so far
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # real token at index?
        self.next_position = torch.zeros(batch, dtype=torch.long, device=device)
        self.ring_index = torch.full((ring,), -1, dtype=torch.long, device=device)  # seq index held by each ring cell
        # (B, ring): the cell holds a real token of the row, i.e. valid at its ring_index (kept so that a decode
        # step's sliding mask is a view, not a gather: each small op of a step costs on every token)
        self.ring_valid = torch.zeros(batch, ring, dtype=torch.bool, device=device)
        self._step_ring_index: Tensor | None = None
        # Called as on_write(slot, start, k, v) with every sliding slot's new K/V (B, H, T, D) from `start`: a prefix
        # cache (engine/prefix_cache.py) keeps positions that the ring overwrites, even within one prefill chunk.
        self.on_write = None

    @property
    def ring(self) -> int:
        """Cells of each sliding slot (the window, or max_len when that is shorter)."""
        return self.ring_index.numel()

    def load_prefix(self, length: int, kv: list[tuple[Tensor, Tensor]]) -> None:
        """Start this (empty, one-row) cache after `length` tokens whose K/V are given: per slot (1, H, n, D) keys and
        values in sequence order, n = `length` for global slots and for sliding slots the last min(length, ring)
        positions at least. Every buffer then holds what prefilling those tokens would have left in it."""
        if self.length or self.batch != 1:
            raise ValueError("load_prefix needs an empty one-row cache")
        if length >= self.max_len:
            raise ValueError(f"a prefix of {length} tokens leaves no room in a cache of {self.max_len}")
        ring = self.ring
        kept = torch.arange(max(0, length - ring), length, device=self.valid.device)
        for slot, kind, (k, v) in zip(self.slots, self.slot_types, kv):
            if kind == SLIDING:
                n = k.shape[2]
                if n < kept.numel():
                    raise ValueError(f"a sliding slot needs the last {kept.numel()} positions, got {n}")
                slot.k[:, :, kept % ring] = k[:, :, n - kept.numel():]
                slot.v[:, :, kept % ring] = v[:, :, n - kept.numel():]
            else:
                slot.k[:, :, :length] = k[:, :, :length]
                slot.v[:, :, :length] = v[:, :, :length]
        self.ring_index[kept % ring] = kept
        self.valid[:, :length] = True
        self.ring_valid = self._key_valid(self.ring_index)
        self.next_position[:] = length
        self.length = length
        self._step_ring_index = None

    # -- what native code reads ------------------------------------------------------------------------------------

    def slot_tensors(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) of every slot, (B, H, capacity, D) each."""
        return [(s.k, s.v) for s in self.slots]

    def write_cells(self) -> tuple[list[int], list[int]]:
        """(sliding, global), per row: the cell its K/V of the current one-token step goes to, as `update` writes
        it. Call after `start`."""
        index = self.length - 1
        ring = next((s.k.shape[2] for s, t in zip(self.slots, self.slot_types) if t == SLIDING), 1)
        return [index % ring] * self.batch, [index] * self.batch

    # -- one forward call ------------------------------------------------------------------------------------------

    def start(self, attention_mask: Tensor | None, new_tokens: int) -> Step:
        """Register `new_tokens` columns (mask (B, T), 1 = real) and build positions and masks for them."""
        start, end = self.length, self.length + new_tokens
        if end > self.max_len:
            raise ValueError(f"the sequence needs {end} positions but the cache holds {self.max_len}")
        if attention_mask is None and new_tokens == 1:
            return self._decode_step(start)
        mask = _as_mask(attention_mask, self.batch, new_tokens, self.valid.device)
        self.valid[:, start:end] = mask
        positions = self.next_position[:, None] + mask.long().cumsum(-1) - 1
        positions = positions.clamp(min=0)
        self.next_position += mask.long().sum(-1)
        q_index = torch.arange(start, end, device=self.valid.device)
        masks = {}
        for kind in set(self.slot_types):
            k_index = self._key_index(kind, start, end)
            masks[kind] = _attention_mask(q_index, k_index, self._key_valid(k_index), self._window_of(kind))
        self.ring_valid = self._key_valid(self.ring_index)
        self.length = end
        return Step(positions=positions, masks=masks, new_tokens=new_tokens)

    def update(self, slot: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new K/V (B, H, T, D) of `slot` and return the keys and values its queries attend to."""
        s, t = self.slots[slot], k.shape[2]
        start = self.length - t
        if self.slot_types[slot] != SLIDING:
            s.k[:, :, start:self.length] = k
            s.v[:, :, start:self.length] = v
            return s.k[:, :, :self.length], s.v[:, :, :self.length]
        ring = s.k.shape[2]
        if self.on_write is not None:
            self.on_write(slot, start, k, v)
        # Until the ring is full only its first cells hold keys, and only those are attended to: the ring's size
        # (the window, or less for a short generation) must not change the arithmetic, or a greedy answer would
        # depend on max_new_tokens (summing over more masked cells rounds differently).
        if t == 1:  # decode: write first, then attend over the ring (its cell order does not matter)
            s.k[:, :, start % ring] = k[:, :, 0]
            s.v[:, :, start % ring] = v[:, :, 0]
            held = min(self.length, ring)
            return s.k[:, :, :held], s.v[:, :, :held]
        held = min(start, ring)
        k_all, v_all = torch.cat((s.k[:, :, :held], k), 2), torch.cat((s.v[:, :, :held], v), 2)
        keep = min(t, ring)
        cells = torch.arange(self.length - keep, self.length, device=k.device) % ring
        s.k[:, :, cells] = k[:, :, t - keep:]
        s.v[:, :, cells] = v[:, :, t - keep:]
        return k_all, v_all

    def _decode_step(self, start: int) -> Step:
        """`start` for one real token per row, in ~12 ops instead of ~50, with the same positions and masks: the
        query (index `start`) is the newest key, so the causal and window conditions hold for every key the
        slots return (a ring holds only the last `ring` <= window indices), and it sees itself (valid now). The
        sliding keys are the ring's cells in order, real where `ring_valid` says so (the masks are views, for this
        call only)."""
        self.valid[:, start] = True
        positions = self.next_position[:, None].clone()
        self.next_position += 1
        masks = {}
        for kind in set(self.slot_types):
            if kind == SLIDING:
                ring = self.ring
                self.ring_index[start % ring] = start
                self.ring_valid[:, start % ring] = True
                masks[kind] = self.ring_valid[:, None, None, :min(start + 1, ring)]
            else:  # keys 0..start; a view is safe: columns already written never change
                masks[kind] = self.valid[:, None, None, :start + 1]
        self._step_ring_index = None
        self.length = start + 1
        return Step(positions=positions, masks=masks, new_tokens=1)

    # -- helpers ---------------------------------------------------------------------------------------------------

    def _window_of(self, kind: str) -> int | None:
        return self.window if kind == SLIDING else None

    def _key_index(self, kind: str, start: int, end: int) -> Tensor:
        """Sequence index of every key a query of this step sees, in the order `update` returns them."""
        device = self.valid.device
        if kind != SLIDING:
            return torch.arange(0, end, device=device)
        if self._step_ring_index is None or self._step_ring_index[0] != start:
            # Compute the ring layout once per step (all sliding slots share it), then advance the ring.
            ring = self.ring_index.numel()
            before = self.ring_index.clone()
            if end - start == 1:
                self.ring_index[start % ring] = start
                keys = self.ring_index[:min(end, ring)].clone()
            else:
                keys = torch.cat((before[:min(start, ring)], torch.arange(start, end, device=device)))
                keep = min(end - start, ring)
                cells = torch.arange(end - keep, end, device=device) % ring
                self.ring_index[cells] = torch.arange(end - keep, end, device=device)
            self._step_ring_index = (start, keys)
        return self._step_ring_index[1]

    def _key_valid(self, k_index: Tensor) -> Tensor:
        """(B, Tk): key holds a real token."""
        return (k_index >= 0)[None, :] & self.valid[:, k_index.clamp(min=0)]


def _as_mask(attention_mask: Tensor | None, batch: int, t: int, device) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, t, dtype=torch.bool, device=device)
    if attention_mask.shape != (batch, t):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, t)}")
    return attention_mask.to(device=device, dtype=torch.bool)


def _attention_mask(q_index: Tensor, k_index: Tensor, key_valid: Tensor, window: int | None) -> Tensor:
    """(B, 1, Tq, Tk): causal, within the window, real keys only; every query also sees itself.

    Seeing itself changes nothing for real tokens and keeps padded query rows finite (an all-masked row would
    give NaN, and NaN values times zero weights would leak into real rows of later layers).
    """
    q, k = q_index[:, None], k_index[None, :]
    allowed = (k <= q) & (k >= 0)
    if window is not None:
        allowed &= k > q - window
    allowed = allowed[None] & key_valid[:, None, :]
    allowed |= (k == q)[None]
    return allowed[:, None]


def ephemeral_step(attention_mask: Tensor | None, batch: int, t: int, slot_types: list[str], window: int | None,
                   device) -> Step:
    """A Step for a teacher-forced forward with no cache: keys are exactly this call's tokens."""
    mask = _as_mask(attention_mask, batch, t, device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    idx = torch.arange(t, device=device)
    masks = {kind: _attention_mask(idx, idx, mask, window if kind == SLIDING else None) for kind in set(slot_types)}
    return Step(positions=positions, masks=masks, new_tokens=t)
