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

With adapters served beside the base (`adapters`, gemma3n.adapters.multi_lora.AdapterSet), a sequence may name
one (`add(..., adapter=NAME)`): every forward runs inside `adapters.selected(<each row's adapter>)`, so the LoRA
layers add to each row its own adapter's delta. Rows with an adapter decode in groups of their own, apart from
base rows: a base-only group keeps the native decode step (the adapted layers stand aside), and its rows the base
model's exact answers.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import kernels
from ..model.batch_cache import BatchCache
from ..model.cache import KVCache
from .inputs import DEFAULT_CHUNK, check_embeds, check_inputs, chunk_end, device_of, token_budget
from .sampling import Sampler, SamplingParams


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

    def __init__(self, model, chunk_size: int = DEFAULT_CHUNK, adapters=None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.chunk_size = model, chunk_size
        self.adapters = adapters  # an AdapterSet (names, `selected(rows)`), or None: the base model only
        self.device = device_of(model)
        self.prefilling: list[Sequence] = []
        self.groups: list[DecodeGroup] = []  # the decoding sequences, at most `group_rows` per forward
        self.group_rows = kernels.MAX_ROWS

    def __len__(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    @property
    def decoding(self) -> list[Sequence]:
        """The sequences past their prompt, in the order they joined."""
        return [seq for group in self.groups for seq in group.rows]

    @property
    def cached_rows(self) -> int:
        """Rows held in decode caches (0 once every sequence has left: their memory is released)."""
        return sum(group.cache.batch for group in self.groups)

    def add(self, input_ids: Tensor, params: SamplingParams, stop_ids=(), inputs_embeds: Tensor | None = None,
            adapter: str | None = None) -> Sequence:
        """Queue one prompt ((T,) or (1, T) ids, with its (1, T, D) merged embeddings when it holds media), to be
        generated with the named adapter (None: the base model); raises ContextLengthError / ValueError at once for
        a bad one."""
        if adapter is not None and (self.adapters is None or adapter not in self.adapters):
            loaded = list(self.adapters.names) if self.adapters is not None else []
            raise ValueError(f"no adapter named {adapter!r} is loaded (loaded: {loaded})")
        ids, _ = check_inputs(input_ids, None, self.device)
        embeds = check_embeds(inputs_embeds, ids)
        if ids.shape[0] != 1:
            raise ValueError(f"ContinuousBatch.add takes one prompt, got {ids.shape[0]} rows")
        length = ids.shape[1]
        budget = token_budget(self.model, length, params.max_new_tokens)
        history = torch.full((1, length + budget), -1, dtype=torch.long, device=self.device)
        history[:, :length] = ids
        with torch.inference_mode():
            cache = self.model.new_cache(1, length + budget)
        seq = Sequence(prompt_tokens=length, params=params, budget=budget, sampler=Sampler(params), history=history,
                       prompt=ids, prompt_embeds=embeds, cache=cache,
                       stop_ids=frozenset(int(i) for i in stop_ids) | frozenset(params.stop_token_ids),
                       adapter=adapter)
        self.prefilling.append(seq)
        return seq

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
        if every:  # column i predicts prompt token i + 1: this chunk's next tokens, and the next chunk's first
            following = torch.cat((chunk[0, 1:], seq.prompt[0, :1])).to(logits.device)
            seq.prompt_logprobs += token_logprobs(logits[0, :following.shape[0]], following, seq.params.logprobs or 0)
        logits = logits[:, -1].float()
        if seq.prompt.shape[1]:
            return []
        self.prefilling.pop(0)
        token = self._sample(seq, logits)
        seq.prefill_seconds = time.perf_counter() - seq._started
        seq._started = time.perf_counter()
        if not seq.done:
            adapted = seq.adapter is not None
            group = next((g for g in self.groups if len(g.rows) < self.group_rows and g.adapted == adapted), None)
            if group is None:
                group = DecodeGroup(BatchCache(seq.cache.slot_types, _ring_of(seq.cache, self.model)),
                                    adapted=adapted)
                self.groups.append(group)
            group.cache.add(seq.cache)
            group.rows.append(seq)
        seq.cache = None  # the batch holds a copy; release the prefill buffers now
        return [(seq, token)]

    def _decode(self) -> list[tuple[Sequence, int | None]]:
        produced = []
        for group in self.groups:
            ids = torch.tensor([[s.pending] for s in group.rows], device=self.device)
            with self._rows_use([s.adapter for s in group.rows]):
                logits = self.model(ids, attention_mask=None, cache=group.cache, last_only=True)[:, -1].float()
            produced += [(seq, self._sample(seq, logits[row:row + 1])) for row, seq in enumerate(group.rows)]
        return produced

    def _sample(self, seq: Sequence, logits: Tensor) -> int | None:
        """Pick the next token of `seq` and record it (the history feeds the repetition penalty)."""
        position = seq.prompt_tokens + seq.sampled
        token = int(seq.sampler.sample(logits, seq.history[:, :position])[0])
        if seq.params.logprobs is not None and token not in seq.stop_ids:
            seq.logprobs += token_logprobs(logits, torch.tensor([token]), seq.params.logprobs)
        seq.history[0, position] = token
        seq.sampled += 1
        seq.pending = token
        if token in seq.stop_ids:
            seq.stop_token = token
            self.finish(seq, "stop")
            return None
        seq.new_ids.append(token)
        if seq.sampled >= seq.budget:
            self.finish(seq, "length")
        return token

    def _drop_finished(self) -> None:
        self.prefilling = [s for s in self.prefilling if not s.done or _release(s)]
        for group in self.groups:
            if any(s.done for s in group.rows):
                keep = [row for row, s in enumerate(group.rows) if not s.done]
                group.cache.keep(keep)
                group.rows = [group.rows[row] for row in keep]
        self.groups = [group for group in self.groups if group.rows]  # an empty group's cache is freed

    def _rows_use(self, adapters: list[str | None]):
        """The context of a forward whose rows use these adapters."""
        if self.adapters is None:
            return contextlib.nullcontext()
        return self.adapters.selected(adapters)

    @staticmethod
    def _clock(seq: Sequence) -> None:
        if seq.prefill_seconds:  # decode time runs from the first token to the end
            seq.decode_seconds = time.perf_counter() - seq._started


def _release(seq: Sequence) -> bool:
    seq.cache = seq.prompt_embeds = None
    return False


def _ring_of(cache: KVCache, model) -> int | None:
    """Ring cells per row for sliding slots: the window, or the whole context when that is shorter."""
    if cache.window is None:
        return None
    return min(cache.window, model.config.max_position_embeddings)
