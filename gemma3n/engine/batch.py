"""The one generation loop: sequences join and leave a running decode batch at step boundaries.

Every generation runs here: a single prompt is a batch of one, `generate_batch` a batch of its rows
(engine/generate.py), the server a batch that never ends. So:

- a new sequence is prefilled alone, in chunks, with the model's ordinary `KVCache` sized for its prompt plus its
  budget of new tokens;
- its K/V are then copied into a `BatchCache` (model/batch_cache.py), where every row owns its keys from column 0
  and has its own length; a decode step feeds one token per row, each at its own position, with one forward for
  all rows;
- a row that finishes (stop id, length, stop string, cancellation) is dropped and its memory released;
- rows decode in groups of at most `kernels.MAX_ROWS`, one forward per group: within that width every row's products
  are computed alone (a wider forward would switch to GEMM paths that round differently, and greedy answers of a
  busy server would then depend on how many other requests run).

Greedy rows therefore give the same tokens whatever else runs beside them (the masked-out keys of shorter rows
contribute exact zeros), and seeded sampling draws from the sequence's own generator.

With a `PrefixCache` (engine/prefix_cache.py), a prompt that begins like an earlier one starts from that K/V and
prefills only the rest; every prompt and every finished sequence leaves an entry for later ones. Siblings (`n`
choices of one request) share one prefill: each samples its first token from the same logits and decodes in a row
of its own, with its own sampler.

With adapters served beside the base (`adapters`, gemma3n.adapters.multi_lora.AdapterSet), a sequence may name
one (`add(..., adapter=NAME)`): every forward runs inside `adapters.selected(<each row's adapter>)`, so the LoRA
layers add to each row its own adapter's delta. Rows with an adapter decode in groups of their own, apart from
base rows: a base-only group keeps the native decode step (the adapted layers stand aside), and its rows the base
model's exact answers. The adapter is part of a sequence's prefix cache key: K/V are never shared across adapters.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..model.batch_cache import BatchCache
from ..model.cache import KVCache
from .prefix_cache import PrefixCache, Recorder, prompt_entry, row_entry
from .inputs import DEFAULT_CHUNK, check_embeds, check_inputs, chunk_end, device_of, token_budget
from .sampling import Sampler, SamplingParams, restrict


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the most likely tokens at its position (id, logprob)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


PROMPT_LOGPROB_CHUNK = 64  # prompt columns per forward when every column's logits are kept (vocab-wide rows)


def token_logprobs(logits: Tensor, tokens: Tensor, top: int) -> list[TokenLogprob]:
    """logits (N, V) float32 and the token at each row (N,) -> their log-probabilities and `top` alternatives."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(-1, tokens[:, None].to(logp.device))[:, 0].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        alts = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alts = [()] * len(chosen)
    return [TokenLogprob(int(t), c, a) for t, c, a in zip(tokens.tolist(), chosen, alts)]


@dataclass(eq=False)
class DecodeGroup:
    """Sequences decoded by one forward call, and their cache."""

    cache: BatchCache
    rows: list["Sequence"] = field(default_factory=list)
    adapted: bool = False  # its rows use adapters (base rows decode in groups of their own)


@dataclass(eq=False)
class Sequence:
    """One prompt being generated inside a `ContinuousBatch`; the fields mirror `Generation`'s."""

    prompt_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    budget: int
    sampler: Sampler
    history: Tensor  # (1, prompt + budget): prompt and sampled ids, for the repetition penalty
    prompt: Tensor  # (1, T) ids still to prefill (emptied as chunks are fed)
    prompt_embeds: Tensor | None  # (1, T, D) their merged input embeddings (a prompt with media), or None
    cache: KVCache | None  # the prefill cache, handed to the batch when the prompt is in
    new_ids: list[int] = field(default_factory=list)
    sampled: int = 0  # tokens produced, stop ids included
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    stop_token: int | None = None  # the stop id that ended it, if one did
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per new token, when params.logprobs is set
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # per prompt token after the first
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    pending: int | None = None  # sampled but not yet fed to the model
    namespace: tuple | None = None  # what besides the ids sets its K/V (prefix cache key); None: not cached
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache instead of prefilled
    siblings: list["Sequence"] = field(default_factory=list)  # more choices of the same prompt, waiting for it
    looked_up: bool = False  # the prefix cache was consulted (at the first prefill chunk)
    recorder: Recorder | None = None  # the sliding K/V of its prompt, for the prefix cache
    prefix_entry: object = None  # its prompt's prefix cache entry
    constraint: Any = None  # this sequence's grammar state (params.constraint.start()), or None: unconstrained
    adapter: str | None = None  # the name of the LoRA adapter it is generated with (None: the base model)
    _started: float = field(default_factory=time.perf_counter)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class ContinuousBatch:
    """Sequences generated together; `add` one at any time, `step()` advances all of them.

    Each `step()` feeds one decode column for every decoding sequence and then at most one prefill chunk (of the
    oldest sequence still prefilling, so a long prompt cannot stall the others for more than a chunk). It returns the
    (sequence, token) pairs it produced; token is None when the sequence ended on a stop id. Finished sequences
    leave the batch at once; `finish(seq, reason)` ends one from outside (stop string, client gone).
    """

    def __init__(self, model, chunk_size: int = DEFAULT_CHUNK, prefix_cache: PrefixCache | None = None,
                 adapters=None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.chunk_size = model, chunk_size
        self.prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.budget else None
        self.adapters = adapters  # an AdapterSet (names, `selected(rows)`), or None: the base model only
        self.device = device_of(model)
        self.prefilling: list[Sequence] = []
        self.groups: list[DecodeGroup] = []  # the decoding sequences, at most `group_rows` per forward
        self.group_rows = kernels.MAX_ROWS

    def __len__(self) -> int:
        return sum(1 + len(s.siblings) for s in self.prefilling) + len(self.decoding)

    @property
    def decoding(self) -> list[Sequence]:
        """The sequences past their prompt, in the order they joined."""
        return [seq for group in self.groups for seq in group.rows]

    @property
    def cached_rows(self) -> int:
        """Rows held in decode caches (0 once every sequence has left: their memory is released)."""
        return sum(group.cache.batch for group in self.groups)

    def add(self, input_ids: Tensor, params: SamplingParams, stop_ids=(), inputs_embeds: Tensor | None = None,
            cache_key=None, siblings=(), adapter: str | None = None) -> Sequence:
        """Queue one prompt ((T,) or (1, T) ids, with its (1, T, D) merged embeddings when it holds media);
        raises ContextLengthError / ValueError at once for a bad one.

        `cache_key`: whatever else decides the prompt's K/V (for a prompt with media, the media's identity: without
        a key such a prompt is not prefix-cached). `siblings`: the SamplingParams of more choices of this prompt,
        prefilled once with it; they are `seq.siblings`. `adapter`: the LoRA adapter to generate with (None: the
        base model)."""
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            loaded = list(self.adapters.names) if self.adapters is not None else []
            raise ValueError(f"no adapter named {adapter!r} is loaded (loaded: {loaded})")
        ids, _ = check_inputs(input_ids, None, self.device)
        embeds = check_embeds(inputs_embeds, ids)
        if ids.shape[0] != 1:
            raise ValueError(f"ContinuousBatch.add takes one prompt, got {ids.shape[0]} rows")
        length = ids.shape[1]
        budgets = [token_budget(self.model, length, p.max_new_tokens) for p in (params, *siblings)]
        with torch.inference_mode():
            cache = self.model.new_cache(1, length + max(budgets))
        namespace = None if embeds is not None and cache_key is None else (cache_key, adapter, embeds is not None)
        seq, *others = [self._sequence(ids, p, b, stop_ids, namespace, adapter)
                        for p, b in zip((params, *siblings), budgets)]
        seq.prompt, seq.prompt_embeds, seq.cache, seq.siblings = ids, embeds, cache, others
        self.prefilling.append(seq)
        return seq

    def _sequence(self, ids: Tensor, params: SamplingParams, budget: int, stop_ids, namespace,
                  adapter: str | None) -> Sequence:
        length = ids.shape[1]
        history = torch.full((1, length + budget), -1, dtype=torch.long, device=self.device)
        history[:, :length] = ids
        return Sequence(prompt_tokens=length, params=params, budget=budget, sampler=Sampler(params), history=history,
                        prompt=ids[:, :0], prompt_embeds=None, cache=None, namespace=namespace,
                        stop_ids=frozenset(int(i) for i in stop_ids) | frozenset(params.stop_token_ids),
                        constraint=None if params.constraint is None else params.constraint.start(),
                        adapter=adapter)

    def finish(self, seq: Sequence, reason: str = "stop", override: bool = False) -> None:
        """End `seq` now; it leaves the batch (and frees its cache) at the start of the next step. `override`: the
        reason replaces one already set (a stop string completed by the token that also reached the length)."""
        if not seq.done or override:
            seq.finish_reason = reason
        self._clock(seq)

    def step(self) -> list[tuple[Sequence, int | None]]:
        with torch.inference_mode():
            self._drop_finished()
            # decode first: a sequence whose prompt ends in this step gets its first token now and its second in
            # the next step, so a step yields at most one token per sequence and a caller can end a sequence
            # (stop string, client gone) between any two of its tokens
            produced = self._decode()
            produced += self._prefill_chunk()
            self._drop_finished()
        return produced

    # -- internals -------------------------------------------------------------------------------------------------

    def _prefill_chunk(self) -> list[tuple[Sequence, int | None]]:
        if not self.prefilling:
            return []
        seq = self.prefilling[0]
        if not seq.looked_up:
            self._resume(seq)
        every = seq.params.prompt_logprobs  # keep every column's logits: smaller chunks bound their memory
        chunk_size = min(self.chunk_size, PROMPT_LOGPROB_CHUNK) if every else self.chunk_size
        size = chunk_end(self.model, seq.prompt, 0, chunk_size)  # never splits an image block (Gemma 3)
        chunk, seq.prompt = seq.prompt[:, :size], seq.prompt[:, size:]
        extra = {}
        if seq.prompt_embeds is not None:  # the embeddings of this chunk's columns
            extra["inputs_embeds"] = seq.prompt_embeds[:, :size]
            seq.prompt_embeds = seq.prompt_embeds[:, size:] if seq.prompt.shape[1] else None
        with self._rows_use([seq.adapter]):
            logits = self.model(chunk, attention_mask=None, cache=seq.cache, last_only=not every, **extra)
        if seq.recorder is not None:
            seq.recorder.after_chunk()
        if every:  # column i predicts prompt token i + 1: this chunk's next tokens, and the next chunk's first
            following = torch.cat((chunk[0, 1:], seq.prompt[0, :1])).to(logits.device)
            seq.prompt_logprobs += token_logprobs(logits[0, :following.shape[0]], following, seq.params.logprobs or 0)
        logits = logits[:, -1].float()
        if seq.prompt.shape[1]:
            return []
        self.prefilling.pop(0)
        if seq.recorder is not None:
            seq.prefix_entry = prompt_entry(seq.namespace, seq.history[0, :seq.prompt_tokens], seq.cache, seq.recorder)
            self.prefix_cache.store(seq.prefix_entry)
            seq.recorder = None
        produced, started, now = [], seq._started, time.perf_counter()
        adapted = seq.adapter is not None
        for member in [seq] + seq.siblings:
            if member.done:  # a choice cancelled while the prompt was prefilled
                continue
            token = self._sample(member, logits)
            member.prefill_seconds, member._started = now - started, now
            member.cached_tokens, member.prefix_entry = seq.cached_tokens, seq.prefix_entry
            if not member.done:
                group = next((g for g in self.groups if len(g.rows) < self.group_rows and g.adapted == adapted), None)
                if group is None:
                    group = DecodeGroup(BatchCache(seq.cache.slot_types, _ring_of(seq.cache, self.model)),
                                        adapted=adapted)
                    self.groups.append(group)
                group.cache.add(seq.cache)
                group.rows.append(member)
            produced.append((member, token))
        seq.cache, seq.siblings = None, []  # the batch holds copies; release the prefill buffers now
        return produced

    def _resume(self, seq: Sequence) -> None:
        """At the first prefill chunk: start from the longest cached prefix of the prompt, and record the sliding K/V
        of the rest for the prompt's own entry."""
        seq.looked_up = True
        if self.prefix_cache is None or seq.namespace is None:
            return
        ring, start, first = seq.cache.ring, 0, None
        # with "echo" every prompt token's logits are wanted, so nothing can be skipped (the entry is still stored)
        found = None if seq.params.prompt_logprobs else self.prefix_cache.lookup(seq.namespace, seq.prompt, ring)
        if found is not None:
            entry, length, segment = found
            seq.cache.load_prefix(length, entry.kv_for(length, ring, segment))
            seq.prompt = seq.prompt[:, length:]
            if seq.prompt_embeds is not None:
                seq.prompt_embeds = seq.prompt_embeds[:, length:]
            seq.cached_tokens = length
            if segment is not None:
                start, first = segment.start, segment.slice(segment.start, length)
        seq.recorder = Recorder(seq.cache, start, first)

    def _decode(self) -> list[tuple[Sequence, int | None]]:
        produced = []
        for group in self.groups:
            ids = torch.tensor([[s.pending] for s in group.rows], device=self.device)
            with self._rows_use([s.adapter for s in group.rows]):
                logits = self.model(ids, attention_mask=None, cache=group.cache, last_only=True)[:, -1]
            logits = logits if logits.dtype == torch.float32 else logits.float()
            produced += [(seq, self._sample(seq, logits[row:row + 1])) for row, seq in enumerate(group.rows)]
        return produced

    def _sample(self, seq: Sequence, logits: Tensor) -> int | None:
        """Pick the next token of `seq` and record it (the history feeds the repetition penalty)."""
        position = seq.prompt_tokens + seq.sampled
        scores = logits if seq.constraint is None else restrict(logits, seq.constraint.logit_bias(seq.stop_ids))
        token = int(seq.sampler.sample(scores, seq.history[:, :position])[0])
        if seq.params.logprobs is not None and token not in seq.stop_ids:  # the model's own, before the grammar
            seq.logprobs += token_logprobs(logits, torch.tensor([token]), seq.params.logprobs)
        seq.history[0, position] = token
        seq.sampled += 1
        seq.pending = token
        if token in seq.stop_ids:
            seq.stop_token = token
            self.finish(seq, "stop")
            return None
        seq.new_ids.append(token)
        if seq.constraint is not None and seq.constraint.advance(token):
            self.finish(seq, "stop")  # the grammar is complete: nothing may follow, not even another forward
        elif seq.sampled >= seq.budget:
            self.finish(seq, "length")
        return token

    def _drop_finished(self) -> None:
        self.prefilling = [s for s in map(_heir, self.prefilling) if s is not None]
        for group in self.groups:
            if any(s.done for s in group.rows):
                if self.prefix_cache is not None:
                    self._store_finished(group)
                keep = [row for row, s in enumerate(group.rows) if not s.done]
                group.cache.keep(keep)
                group.rows = [group.rows[row] for row in keep]
        self.groups = [group for group in self.groups if group.rows]  # an empty group's cache is freed

    def _store_finished(self, group: DecodeGroup) -> None:
        """Finished rows leave their prompt and answer in the prefix cache (the next turn of a chat starts there)."""
        for row, seq in enumerate(group.rows):
            if seq.done and seq.namespace is not None:
                prompt = seq.prefix_entry if self.prefix_cache.holds(seq.prefix_entry) else None
                self.prefix_cache.store(row_entry(seq.namespace, seq.history[0], group.cache, row, prompt))
            seq.prefix_entry = None if seq.done else seq.prefix_entry

    def _rows_use(self, adapters: list[str | None]):
        """The context of a forward whose rows use these adapters."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.selected(adapters)

    @staticmethod
    def _clock(seq: Sequence) -> None:
        if seq.prefill_seconds:  # decode time runs from the first token to the end
            seq.decode_seconds = time.perf_counter() - seq._started


def _heir(seq: Sequence) -> Sequence | None:
    """`seq` while it prefills; when it was ended, the first of its siblings still wanted takes its prompt, cache and
    place; None when none is (its memory is released)."""
    if not seq.done:
        return seq
    live = [s for s in seq.siblings if not s.done]
    if seq.cache is not None:
        seq.cache.on_write = None
    heir = None
    if live:
        heir, heir.siblings = live[0], live[1:]
        for name in ("prompt", "prompt_embeds", "cache", "recorder", "looked_up", "cached_tokens", "_started"):
            setattr(heir, name, getattr(seq, name))
        if heir.recorder is not None:
            heir.cache.on_write = heir.recorder
    seq.cache = seq.prompt_embeds = seq.recorder = None
    seq.siblings = []
    return heir


def _ring_of(cache: KVCache, model) -> int | None:
    """Ring cells per row for sliding slots: the window, or the whole context when that is shorter."""
    if cache.window is None:
        return None
    return min(cache.window, model.config.max_position_embeddings)
