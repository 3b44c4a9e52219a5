"""Prefill + decode loop over any causal LM, stop tokens and strings, streaming detokenisation.

The model interface (Gemma 3n `CausalLM` and the Gemma 3 model share it): `model.config.max_position_embeddings`,
`model.new_cache(batch, max_len) -> cache`, and `model(input_ids, attention_mask=, cache=, last_only=)` -> float32
logits (B, T or 1, V), where every call with a cache appends its columns to it. A prompt may come with
`inputs_embeds` (B, T, D), the multimodal merge of its embeddings; the prefill then passes the matching slice of it
as `model(..., inputs_embeds=)`. A tokenizer is anything with
`decode(ids) -> str`.

Batches are left-padded (`attention_mask` 1 = real token); each row is generated as its own sequence of the one
generation loop (`BatchGeneration` over engine/batch.py's `ContinuousBatch`), so a row computes exactly what its
prompt computes alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .batch import ContinuousBatch, Sequence
from .inputs import DEFAULT_CHUNK, ContextLengthError, check_embeds, check_inputs
from .sampling import SamplingParams

REPLACEMENT = "\ufffd"  # what a decoder returns for an incomplete UTF-8 sequence


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


class BatchGeneration:
    """The generation of a batch of prompts, run by the one generation loop (engine/batch.py): each row is a
    sequence of its own in a `ContinuousBatch` (its real tokens only, so left padding changes nothing), prefilled
    alone and then decoded with the others. A single prompt is a batch of one; the server's requests are the same
    sequences joining one long-running batch.

    Iterate to run it: each item holds, per row, the token that step produced, or None (the row produced nothing
    this step: still prefilling, finished, or it produced a stop id, which is not part of the output). `stop(row)`
    ends a row early, e.g. on a stop string.
    """

    def __init__(self, model, input_ids: Tensor, params: SamplingParams, stop_ids: Iterable[int] = (), *,
                 attention_mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                 inputs_embeds: Tensor | None = None, adapters=None, adapter: str | None = None):
        self.loop = ContinuousBatch(model, chunk_size, adapters=adapters)
        ids, mask = check_inputs(input_ids, attention_mask, self.loop.device)
        embeds = check_embeds(inputs_embeds, ids)
        real = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        # every row is checked (too long for the context, ...) before any of them starts
        self.rows: list[Sequence] = [
            self.loop.add(ids[r][real[r]][None], params, stop_ids,
                          None if embeds is None else embeds[r][real[r]][None], adapter=adapter)
            for r in range(ids.shape[0])]
        self._started = False

    @property
    def batch(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> bool:
        return all(seq.done for seq in self.rows)

    def stop(self, row: int) -> None:
        """End `row` now (its last token completed a stop string); it wins over a 'length' set by that token."""
        self.loop.finish(self.rows[row], "stop", override=True)

    def __iter__(self) -> Iterator[list[int | None]]:
        if self._started:
            raise RuntimeError("a BatchGeneration runs once; build a new one to generate again")
        self._started = True
        row_of = {id(seq): row for row, seq in enumerate(self.rows)}
        while len(self.loop):
            produced = self.loop.step()
            if not produced:  # a prefill chunk that did not end its prompt
                continue
            tokens: list[int | None] = [None] * self.batch  # a step gives each sequence at most one token
            for seq, token in produced:
                tokens[row_of[id(seq)]] = token
            yield tokens

    # per-row records, as `Generation` reports them
    @property
    def new_ids(self) -> list[list[int]]:
        return [seq.new_ids for seq in self.rows]

    @property
    def stop_tokens(self) -> list[int | None]:
        return [seq.stop_token for seq in self.rows]

    @property
    def finish_reasons(self) -> list[str | None]:
        return [seq.finish_reason for seq in self.rows]


def _run(decoder: BatchGeneration, streams: list[TextStream] | None) -> Iterator[tuple[int, str]]:
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


def _results(decoder: BatchGeneration, streams: list[TextStream] | None) -> list[Generation]:
    return [Generation(text=streams[r].text if streams else "", token_ids=seq.new_ids,
                       prompt_tokens=seq.prompt_tokens, new_tokens=seq.sampled, finish_reason=seq.finish_reason,
                       prefill_seconds=seq.prefill_seconds, decode_seconds=seq.decode_seconds)
            for r, seq in enumerate(decoder.rows)]


def generate_ids(model, input_ids: Tensor, params: SamplingParams, stop_ids: Iterable[int] = (), *,
                 attention_mask: Tensor | None = None, tokenizer=None, chunk_size: int = DEFAULT_CHUNK,
                 inputs_embeds: Tensor | None = None, include_stop_ids: bool = False, adapters=None,
                 adapter: str | None = None) -> list[list[int]]:
    """New ids of every row; a row that a stop id ended ends with that id only with `include_stop_ids` (the
    transformers convention for returned ids). Stop strings in `params` need `tokenizer`. `adapter` names one of
    `adapters` (a gemma3n.adapters.multi_lora.AdapterSet) to generate every row with."""
    decoder = BatchGeneration(model, input_ids, params, stop_ids, attention_mask=attention_mask, chunk_size=chunk_size,
                              inputs_embeds=inputs_embeds, adapters=adapters, adapter=adapter)
    streams = _streams(tokenizer, params, decoder.batch) if params.stop else None
    for _ in _run(decoder, streams):
        pass
    if not include_stop_ids:
        return decoder.new_ids
    return [ids + ([stop] if stop is not None else []) for ids, stop in zip(decoder.new_ids, decoder.stop_tokens)]


def generate_batch(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
                   attention_mask: Tensor | None = None, chunk_size: int = DEFAULT_CHUNK,
                   inputs_embeds: Tensor | None = None, adapters=None,
                   adapter: str | None = None) -> list[Generation]:
    """Generate every row of a (left-padded) batch to completion; each row stops on its own. With no tokenizer
    (allowed only without stop strings) the texts are empty."""
    decoder = BatchGeneration(model, input_ids, params, stop_ids, attention_mask=attention_mask, chunk_size=chunk_size,
                              inputs_embeds=inputs_embeds, adapters=adapters, adapter=adapter)
    streams = _streams(tokenizer, params, decoder.batch)
    for _ in _run(decoder, streams):
        pass
    return _results(decoder, streams)


def generate(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
             chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None, adapters=None,
             adapter: str | None = None) -> Generation:
    """Generate the continuation of one prompt ((T,) or (1, T) ids)."""
    return generate_batch(model, _one_row(input_ids), params, tokenizer, stop_ids, chunk_size=chunk_size,
                          inputs_embeds=inputs_embeds, adapters=adapters, adapter=adapter)[0]


class TextIterator:
    """Streaming generation of one prompt: iterate for text pieces; afterwards `generation` holds the result
    (it stays None if the iteration is abandoned early)."""

    def __init__(self, model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (),
                 *, chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None, adapters=None,
                 adapter: str | None = None):
        # Built eagerly so a bad prompt (too long, wrong shape) raises here, not at the first `next()`.
        self._decoder = BatchGeneration(model, _one_row(input_ids), params, stop_ids, chunk_size=chunk_size,
                                        inputs_embeds=inputs_embeds, adapters=adapters, adapter=adapter)
        self._streams = _streams(tokenizer, params, 1)
        self.generation: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for _, piece in _run(self._decoder, self._streams):
            yield piece
        self.generation = _results(self._decoder, self._streams)[0]


def stream(model, input_ids: Tensor, params: SamplingParams, tokenizer, stop_ids: Iterable[int] = (), *,
           chunk_size: int = DEFAULT_CHUNK, inputs_embeds: Tensor | None = None, adapters=None,
           adapter: str | None = None) -> TextIterator:
    """Text pieces of one prompt's continuation as its tokens arrive (see `TextStream` for the guarantees)."""
    return TextIterator(model, input_ids, params, tokenizer, stop_ids, chunk_size=chunk_size,
                        inputs_embeds=inputs_embeds, adapters=adapters, adapter=adapter)


def _one_row(input_ids) -> Tensor:
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected one prompt of shape (T,) or (1, T), got {tuple(ids.shape)}; "
                         "use generate_batch for several")
    return ids


__all__ = ["BatchGeneration", "ContextLengthError", "Generation", "TextIterator", "TextStream", "generate",
           "generate_batch", "generate_ids", "stream"]
