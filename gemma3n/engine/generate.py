"""Prefill + decode loop over any causal LM, stop tokens and strings, streaming detokenisation.

The model interface (Gemma 3n `CausalLM` and the Gemma 3 model share it): `model.config.max_position_embeddings`,
`model.new_cache(batch, max_len) -> cache`, and `model(input_ids, attention_mask=, cache=, last_only=)` -> float32
logits (B, T or 1, V), where every call with a cache appends its columns to it. A prompt may come with
`inputs_embeds` (B, T, D), the multimodal merge of its embeddings; the prefill then passes the matching slice of it
as `model(..., inputs_embeds=)`. A tokenizer is anything with
`decode(ids) -> str`.

Batches are left-padded (`attention_mask` 1 = real token); all rows advance one column per step, and a row that
has finished is fed masked padding until the last row finishes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

from .sampling import Sampler, SamplingParams

DEFAULT_CHUNK = 1024  # prompt columns per prefill forward: bounds the activations of long prompts
REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


class ContextLengthError(ValueError):
    """The prompt leaves no room for a new token in the model's context."""


@dataclass
class Generation:
    """One finished row.

    `token_ids` are the sampled ids without a final stop id; when a stop string ended the row, they include the
    tokens that spelled it while `text` is cut just before it. `new_tokens` counts every token the model produced
    (a stop id included). `prefill_seconds` covers the prompt and the first token; `decode_seconds` the rest.
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    finish_reason: str  # "stop" (stop id or string) | "length" (max_new_tokens or the context is full)
    prefill_seconds: float
    decode_seconds: float


class TextStream:
    """Incremental detokenisation of one sequence: `push` ids, get the text pieces that are safe to show.

    A piece never ends inside a UTF-8 character (a decode that ends in U+FFFD waits for more ids), and never
    contains a stop string or anything after it: text that could be the start of a stop string is held back until
    the next ids settle it. The pieces, then `finish()`, join to exactly `tokenizer.decode(ids)` (or its part before
    the first stop string). Each push decodes all ids so far, which is exact for any tokenizer whose decode of a
    longer list extends the decode of a shorter one.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # everything returned so far
        self.stopped = False  # a stop string was found; nothing more will be returned

    def push(self, token_id: int) -> str:
        """Add one id; return the newly safe text (often "")."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        decoded = self.tokenizer.decode(self.ids)
        cut = _first_stop(decoded, self.stop, len(self.text))
        if cut is not None:
            self.stopped = True
            return self._advance(decoded[:cut])
        if decoded.endswith(REPLACEMENT):
            return ""
        return self._advance(decoded[:len(decoded) - _pending_stop_prefix(decoded, self.stop)])

    def finish(self) -> str:
        """The sequence ended without a stop string: release everything held back."""
        if self.stopped or not self.ids:
            return ""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, upto: str) -> str:
        piece = upto[len(self.text):]
        self.text += piece
        return piece


def _first_stop(text: str, stops: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:]; earlier text was checked when it was returned."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _pending_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Decoder:
    """The generation of one batch; iterate to run it, one decode step per item.

    Each item holds, per row, the token that step produced, or None when the row had already finished or produced
    a stop id (stop ids are not part of the output). `stop(row)` ends a row early, e.g. on a stop string.
    """

    def __init__(self, model, input_ids: Tensor, params: SamplingParams, stop_ids: Iterable[int] = (), *,
                 attention_mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                 inputs_embeds: Tensor | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        self.model, self.params, self.chunk_size = model, params, chunk_size
        self.input_ids, self.attention_mask = check_inputs(input_ids, attention_mask, device_of(model))
        self.inputs_embeds = check_embeds(inputs_embeds, self.input_ids)
        self.stop_ids = frozenset(int(i) for i in stop_ids) | frozenset(params.stop_token_ids)
        batch, length = self.input_ids.shape
        self.budget = token_budget(model, length, params.max_new_tokens)
        with torch.inference_mode():
            self.cache = model.new_cache(batch, length + self.budget)
        self.sampler = Sampler(params)
        # Prompt + new ids for the repetition penalty; padding is -1, which the penalty ignores.
        self.history = torch.full((batch, length + self.budget), -1, dtype=torch.long, device=self.input_ids.device)
        real = self.attention_mask.bool() if self.attention_mask is not None else torch.ones_like(self.input_ids).bool()
        self.history[:, :length] = self.input_ids.masked_fill(~real, -1)
        self.prompt_tokens: list[int] = real.sum(-1).tolist()
        self.new_ids: list[list[int]] = [[] for _ in range(batch)]
        self.stop_tokens: list[int | None] = [None] * batch  # the stop id that ended each row, if one did
        self.sampled = [0] * batch  # tokens produced per row, stop ids included
        self.finish_reasons: list[str | None] = [None] * batch
        self.prefill_seconds = self.decode_seconds = 0.0
        self._started = False

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def stop(self, row: int) -> None:
        """End `row` now (its last token completed a stop string); it wins over a 'length' set by that token."""
        self.finish_reasons[row] = "stop"

    def __iter__(self) -> Iterator[list[int | None]]:
        if self._started:
            raise RuntimeError("a Decoder runs once; build a new one to generate again")
        self._started = True
        start = time.perf_counter()
        logits = self._prefill()
        first = True
        try:
            for step in range(self.budget):
                tokens = self.sampler.sample(logits, self.history[:, :self.input_ids.shape[1] + step]).tolist()
                if first:  # .tolist() waited for the device, so the clock is honest
                    now = time.perf_counter()
                    self.prefill_seconds, start, first = now - start, now, False
                yield self._record(tokens, step)
                if self.done:
                    break
                logits = self._feed(tokens)
        finally:
            if not first:
                self.decode_seconds = time.perf_counter() - start

    def _prefill(self) -> Tensor:
        """Feed the prompt in chunks; the logits of its last column (every row ends on a real token)."""
        ids, mask, embeds = self.input_ids, self.attention_mask, self.inputs_embeds
        start = 0
        while start < ids.shape[1]:
            end = chunk_end(self.model, ids, start, self.chunk_size)
            logits = self._forward(ids[:, start:end], None if mask is None else mask[:, start:end],
                                   None if embeds is None else embeds[:, start:end])
            start = end
        return logits

    def _feed(self, tokens: list[int]) -> Tensor:
        """One decode column: active rows get their new token, finished rows masked padding."""
        active = [r is None for r in self.finish_reasons]
        ids = torch.tensor([[t if a else 0] for t, a in zip(tokens, active)], device=self.input_ids.device)
        mask = None if all(active) else torch.tensor([[int(a)] for a in active], device=self.input_ids.device)
        return self._forward(ids, mask)

    def _forward(self, ids: Tensor, mask: Tensor | None, embeds: Tensor | None = None) -> Tensor:
        # inference_mode per call, never across a `yield`, so it does not leak into the caller's code.
        extra = {} if embeds is None else {"inputs_embeds": embeds}
        with torch.inference_mode():
            logits = self.model(ids, attention_mask=mask, cache=self.cache, last_only=True, **extra)
        return logits[:, -1].float()

    def _record(self, tokens: list[int], step: int) -> list[int | None]:
        # The history may have been made under inference mode (a caller's decorator) and be iterated outside it.
        with torch.inference_mode():
            self.history[:, self.input_ids.shape[1] + step] = torch.tensor(tokens, device=self.history.device)
        produced: list[int | None] = []
        for row, token in enumerate(tokens):
            if self.finish_reasons[row] is not None:
                produced.append(None)
                continue
            self.sampled[row] += 1
            if token in self.stop_ids:
                self.finish_reasons[row] = "stop"
                self.stop_tokens[row] = token
                produced.append(None)
                continue
            self.new_ids[row].append(token)
            produced.append(token)
            if self.sampled[row] >= self.budget:
                self.finish_reasons[row] = "length"
        return produced


def chunk_end(model, input_ids: Tensor, start: int, chunk_size: int) -> int:
    """The end of the prefill chunk that starts at `start`: `chunk_size` columns, or more where the model must see
    a block of columns in one call (`model.chunk_end`, e.g. Gemma 3's bidirectional image blocks)."""
    end = min(start + chunk_size, input_ids.shape[1])
    widen = getattr(model, "chunk_end", None)
    return end if widen is None else widen(input_ids, start, end)


def device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_inputs(input_ids, attention_mask, device) -> tuple[Tensor, Tensor | None]:
    """(B, T) long ids (a 1-D prompt is one row) and the matching mask, which must be left padding."""
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.is_floating_point() or ids.is_complex():
        raise ValueError(f"input_ids must be integer ids of shape (batch, length >= 1), got {tuple(ids.shape)} "
                         f"{ids.dtype}")
    ids = ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return ids, None
    mask = torch.as_tensor(attention_mask)
    mask = mask[None] if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
    mask = mask.to(device=device, dtype=torch.long)
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask: every row must end with a real token; pad batches on the left")
    return ids, mask


def check_embeds(embeds, ids: Tensor) -> Tensor | None:
    if embeds is None:
        return None
    if embeds.dim() != 3 or tuple(embeds.shape[:2]) != tuple(ids.shape):
        raise ValueError(f"inputs_embeds must have shape (batch, length, hidden) matching input_ids {tuple(ids.shape)}, "
                         f"got {tuple(embeds.shape)}")
    return embeds.to(ids.device)


def token_budget(model, prompt_len: int, max_new_tokens: int) -> int:
    """New tokens allowed: max_new_tokens, capped so that prompt + new tokens fit the context."""
    context = model.config.max_position_embeddings
    if prompt_len + 1 > context:
        raise ContextLengthError(
            f"the prompt is {prompt_len} tokens but the model's context holds {context}, so no token can be "
            f"generated; shorten the prompt to at most {context - 1} tokens")
    return min(max_new_tokens, context - prompt_len)


def _run(decoder: Decoder, streams: list[TextStream] | None) -> Iterator[tuple[int, str]]:
    """Drive the decoder, feeding each row's tokens to its stream; yields (row, text piece)."""
    for produced in decoder:
        for row, token in enumerate(produced):
            if token is None or streams is None:
                continue
            piece = streams[row].push(token)
            if streams[row].stopped:
                decoder.stop(row)
            if piece:
                yield row, piece
    for row, stream_ in enumerate(streams or ()):
        piece = stream_.finish()
        if piece:
            yield row, piece


def _streams(tokenizer, params: SamplingParams, batch: int) -> list[TextStream] | None:
    if tokenizer is None:
        if params.stop:
            raise ValueError(f"stop strings {params.stop} need a tokenizer (anything with decode(ids) -> str)")
        return None
    return [TextStream(tokenizer, params.stop) for _ in range(batch)]


def _results(decoder: Decoder, streams: list[TextStream] | None) -> list[Generation]:
    return [Generation(text=streams[r].text if streams else "", token_ids=decoder.new_ids[r],
                       prompt_tokens=decoder.prompt_tokens[r], new_tokens=decoder.sampled[r],
                       finish_reason=decoder.finish_reasons[r],
                       prefill_seconds=decoder.prefill_seconds, decode_seconds=decoder.decode_seconds)
            for r in range(decoder.batch)]


def generate_ids(model, input_ids: Tensor, params: SamplingParams, stop_ids: Iterable[int] = (), *,
                 attention_mask: Tensor | None = None, tokenizer=None, chunk_size: int = DEFAULT_CHUNK,
                 inputs_embeds: Tensor | None = None, include_stop_ids: bool = False) -> list[list[int]]:
    """New ids of every row; a row that a stop id ended ends with that id only with `include_stop_ids` (the
    transformers convention for returned ids). Stop strings in `params` need `tokenizer`."""
    decoder = Decoder(model, input_ids, params, stop_ids, attention_mask=attention_mask, chunk_size=chunk_size,
                      inputs_embeds=inputs_embeds)
    streams = _streams(tokenizer, params, decoder.batch) if params.stop else None
    for _ in _run(decoder, streams):
        pass
    if not include_stop_ids:
        return decoder.new_ids
    return [ids + ([stop] if stop is not None else []) for ids, stop in zip(decoder.new_ids, decoder.stop_tokens)]


def generate_batch(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
                   attention_mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                   inputs_embeds: Tensor | None = None) -> list[Generation]:
    """Generate every row of a (left-padded) batch to completion; each row stops on its own. With no tokenizer
    (allowed only without stop strings) the texts are empty."""
    decoder = Decoder(model, input_ids, params, stop_ids, attention_mask=attention_mask, chunk_size=chunk_size,
                      inputs_embeds=inputs_embeds)
    streams = _streams(tokenizer, params, decoder.batch)
    for _ in _run(decoder, streams):
        pass
    return _results(decoder, streams)


def generate(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
             chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None) -> Generation:
    """Generate the continuation of one prompt ((T,) or (1, T) ids)."""
    return generate_batch(model, _one_row(input_ids), params, tokenizer, stop_ids, chunk_size=chunk_size,
                          inputs_embeds=inputs_embeds)[0]


class TextIterator:
    """Streaming generation of one prompt: iterate for text pieces; afterwards `generation` holds the result
    (it stays None if the iteration is abandoned early)."""

    def __init__(self, model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (),
                 *, chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None):
        # Built eagerly so a bad prompt (too long, wrong shape) raises here, not at the first `next()`.
        self._decoder = Decoder(model, _one_row(input_ids), params, stop_ids, chunk_size=chunk_size,
                                inputs_embeds=inputs_embeds)
        self._streams = _streams(tokenizer, params, 1)
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for _, piece in _run(self._decoder, self._streams):
            yield piece
        self.generation = _results(self._decoder, self._streams)[0]


def stream(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
           chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None) -> TextIterator:
    """Text pieces of one prompt's continuation as its tokens arrive (see `TextStream` for the guarantees)."""
    return TextIterator(model, input_ids, params, tokenizer, stop_ids, chunk_size=chunk_size,
                        inputs_embeds=inputs_embeds)


def _one_row(input_ids) -> Tensor:
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected one prompt of shape (T,) or (1, T), got {tuple(ids.shape)}; "
                         "use generate_batch for several")
    return ids
