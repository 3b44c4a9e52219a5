"""Prefix caching: the K/V of earlier prompts (and of their answers) kept for later requests that begin the same way.

The next turn of a chat re-sends the whole conversation, and many requests share a long system prompt; recomputing
their common beginning is most of the prefill. An `Entry` keeps the token ids of one sequence and its K/V in sequence
order; a new prompt whose ids begin with an entry's ids (under the same namespace: anything else that changes K/V,
such as the request's LoRA adapter or its media) is started from that K/V (`KVCache.load_prefix`) and only its new
tokens are prefilled. At least the last prompt token is always prefilled: its logits choose the first new token.

Sliding-window layers keep a ring of only the last `window` positions, so resuming at position p needs the K/V of
positions [p - ring, p) of those layers. An entry keeps them as *segments* of consecutive positions: the whole
prompt (recorded while it was prefilled, through `KVCache.on_write`, so positions the ring overwrote are kept too)
and the end of the answer (what the decode ring still held when the sequence finished). A prefix p can be resumed
from a segment [s, e) when p <= e and s == 0 or p - ring >= s; a longer match is cut back to the longest such p.
Global layers keep all positions. Gemma 3n's KV-shared layers own no slot and need nothing.

Memory is bounded by a byte budget; the least recently used entries are evicted first. An entry whose ids and
positions another entry covers is dropped (a finished answer supersedes its prompt's entry).

Resumed K/V are the same numbers, but the prompt's remaining tokens are then prefilled in other chunks than a cold
prefill would use, and an answer's K/V were computed one token at a time: logits agree to float rounding (chunked
prefill has the same property), not bit for bit.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable

import torch
from torch import Tensor

from ..config import SLIDING

MiB = 1 << 20


@dataclass
class Segment:
    """Consecutive positions [start, end) of every sliding slot: slot -> (1, H, end - start, D) keys and values."""

    start: int
    end: int
    kv: dict[int, tuple[Tensor, Tensor]]

    def slice(self, lo: int, hi: int) -> dict[int, tuple[Tensor, Tensor]]:
        a, b = lo - self.start, hi - self.start
        return {slot: (k[:, :, a:b], v[:, :, a:b]) for slot, (k, v) in self.kv.items()}


@dataclass(eq=False)
class Entry:
    """The K/V of one token sequence: global slots all positions, sliding slots the positions of `segments`."""

    namespace: Hashable
    tokens: Tensor  # (L,) int64 on the CPU
    full: dict[int, tuple[Tensor, Tensor]]  # global slot -> (1, H, L, D)
    segments: list[Segment]
    slot_types: list[str]
    key: int = field(default_factory=itertools.count().__next__)

    @property
    def length(self) -> int:
        return self.tokens.numel()

    @property
    def nbytes(self) -> int:
        tensors = [t for kv in self.full.values() for t in kv]
        tensors += [t for seg in self.segments for kv in seg.kv.values() for t in kv]
        return sum(t.numel() * t.element_size() for t in tensors) + self.tokens.numel() * 8

    def resumable(self, wanted: int, ring: int) -> tuple[int, Segment | None]:
        """The longest prefix <= `wanted` whose K/V this entry can give to a cache with `ring` sliding cells, and the
        segment that holds its sliding positions."""
        wanted = min(wanted, self.length)
        if SLIDING not in self.slot_types:
            return wanted, None
        best, where = 0, None
        for seg in self.segments:
            p = min(wanted, seg.end)
            if p > best and (seg.start == 0 or p - ring >= seg.start):
                best, where = p, seg
        return best, where

    def kv_for(self, length: int, ring: int, seg: Segment | None) -> list[tuple[Tensor, Tensor]]:
        """Per slot, the K/V `KVCache.load_prefix` needs to start after `length` tokens."""
        sliding = seg.slice(max(seg.start, length - ring), length) if seg is not None else {}
        return [sliding[i] if kind == SLIDING else (self.full[i][0][:, :, :length], self.full[i][1][:, :, :length])
                for i, kind in enumerate(self.slot_types)]

    def covers(self, other: "Entry") -> bool:
        """Every prefix `other` can resume, this entry can resume too."""
        if other.namespace != self.namespace or other.length > self.length:
            return False
        if not torch.equal(self.tokens[:other.length], other.tokens):
            return False
        return all(any(s.start <= o.start and o.end <= s.end for s in self.segments) for o in other.segments)


class Recorder:
    """Collects a prefilling sequence's sliding K/V, every position, for the entry of its prompt (`KVCache.on_write`)."""

    def __init__(self, cache, start: int = 0, first: dict[int, tuple[Tensor, Tensor]] | None = None):
        self.cache = cache
        self.start = start  # the first position recorded
        self.parts: dict[int, list[tuple[Tensor, Tensor]]] = {
            i: [first[i]] if first else [] for i, kind in enumerate(cache.slot_types) if kind == SLIDING}
        self.end = cache.length  # positions [start, end) are recorded
        self.written: int | None = None  # the end of what on_write received in the current forward
        cache.on_write = self

    def __call__(self, slot: int, start: int, k: Tensor, v: Tensor) -> None:
        self.parts[slot].append((k.detach(), v.detach()))
        self.written = start + k.shape[2]

    def after_chunk(self) -> None:
        """Once per forward: positions a native one-token step wrote straight into the ring are read from it."""
        end = self.cache.length
        if self.written != end:
            ring = self.cache.ring
            cells = torch.arange(max(self.end, end - ring), end) % ring
            for slot in self.parts:
                s = self.cache.slots[slot]
                self.parts[slot].append((s.k[:, :, cells], s.v[:, :, cells]))
        self.end, self.written = end, None

    def segment(self) -> Segment:
        self.cache.on_write = None
        kv = {slot: (torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2))
              for slot, parts in self.parts.items()}
        return Segment(self.start, self.end, kv)


@dataclass
class PrefixStats:
    lookups: int = 0  # prompts looked up
    hits: int = 0  # prompts that resumed from an entry
    query_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # prompt tokens taken from entries instead of prefilled
    stored: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0


class PrefixCache:
    """Entries under a byte budget, least recently used evicted first. One thread (the batch's) uses it; `stats()`
    may be read from any thread."""

    def __init__(self, budget_bytes: int):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes < 0:
            raise ValueError(f"the prefix cache budget must be an int >= 0 (bytes), got {budget_bytes!r}")
        self.budget = budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()
        self.bytes = 0
        self._stats = PrefixStats()
        self._lock = threading.Lock()

    def stats(self) -> PrefixStats:
        with self._lock:
            return PrefixStats(**{**vars(self._stats), "entries": len(self.entries), "bytes": self.bytes})

    def lookup(self, namespace: Hashable, ids: Tensor, ring: int) -> tuple[Entry, int, Segment | None] | None:
        """The entry that resumes the most of `ids` (1-D), leaving at least its last token to prefill, or None."""
        ids = ids.reshape(-1).cpu()
        wanted = ids.numel() - 1
        best = None
        for entry in self.entries.values():
            if entry.namespace != namespace:
                continue
            n = min(wanted, entry.length)
            differ = (entry.tokens[:n] != ids[:n]).nonzero()
            common = int(differ[0]) if differ.numel() else n
            if best is not None and common <= best[1]:
                continue
            length, seg = entry.resumable(common, ring)
            if length > 0 and (best is None or length > best[1]):
                best = (entry, length, seg)
        with self._lock:
            self._stats.lookups += 1
            self._stats.query_tokens += ids.numel()
            if best is not None:
                self._stats.hits += 1
                self._stats.hit_tokens += best[1]
                self.entries.move_to_end(best[0].key)
        return best

    def store(self, entry: Entry) -> bool:
        """Keep `entry` (evicting the least recently used beyond the budget); False when it is not kept (larger than
        the whole budget, or covered by an entry already held, which is then marked as used)."""
        size = entry.nbytes
        if size > self.budget:
            return False
        for held in list(self.entries.values()):
            if held.covers(entry):
                self.entries.move_to_end(held.key)
                return False
            if entry.covers(held):
                self._drop(held)
        with self._lock:
            self.entries[entry.key] = entry
            self.bytes += size
            self._stats.stored += 1
            while self.bytes > self.budget:
                self._stats.evictions += 1
                self._drop(next(iter(self.entries.values())), locked=True)
        return True

    def holds(self, entry: Entry | None) -> bool:
        return entry is not None and entry.key in self.entries

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()
            self.bytes = 0

    def _drop(self, entry: Entry, locked: bool = False) -> None:
        if not locked:
            with self._lock:
                return self._drop(entry, locked=True)
        if self.entries.pop(entry.key, None) is not None:
            self.bytes -= entry.nbytes


def prompt_entry(namespace: Hashable, tokens: Tensor, cache, recorder: Recorder) -> Entry:
    """The entry of a prompt just prefilled into the one-row KVCache `cache` (its sliding positions recorded)."""
    length = cache.length
    full = {i: (s.k[:, :, :length].clone(), s.v[:, :, :length].clone())
            for i, (s, kind) in enumerate(zip(cache.slots, cache.slot_types)) if kind != SLIDING}
    segments = [recorder.segment()] if recorder.parts else []
    return Entry(namespace, tokens.reshape(-1)[:length].cpu().clone(), full, segments, list(cache.slot_types))


def row_entry(namespace: Hashable, tokens: Tensor, batch_cache, row: int, prompt: Entry | None) -> Entry:
    """The entry of a finished row of a BatchCache: its prompt and answer. `prompt`, the entry of its prompt when
    still held, gives the sliding positions the decode ring no longer holds."""
    length, kv = batch_cache.row_kv(row)
    types = list(batch_cache.slot_types)
    full = {i: kv[i] for i, kind in enumerate(types) if kind != SLIDING}
    segments = []
    if SLIDING in types:
        start = length - kv[types.index(SLIDING)][0].shape[2]
        tail = Segment(start, length, {i: kv[i] for i, kind in enumerate(types) if kind == SLIDING})
        held = prompt.segments if prompt is not None else []
        joint = min((s for s in held if s.start <= start <= s.end), key=lambda s: s.start, default=None)
        if joint is not None:  # the prompt's positions and the ring's meet: one segment
            before = joint.slice(joint.start, start)
            tail = Segment(joint.start, length, {i: (torch.cat((before[i][0], k), 2), torch.cat((before[i][1], v), 2))
                                                 for i, (k, v) in tail.kv.items()})
        segments += [s for s in held if s.start < tail.start and s.end < start]  # earlier positions, apart
        segments.append(tail)
    return Entry(namespace, tokens.reshape(-1)[:length].cpu().clone(), full, segments, types)
