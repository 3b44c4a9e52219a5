"""Engine invariants of the decode loop: cached == full recompute, batched == one by one, stops, streaming."""
from __future__ import annotations

import pytest
import torch

from gemma3n.engine.generate import BatchGeneration, ContextLengthError, TextStream, generate, generate_batch, \
    generate_ids, stream
from gemma3n.engine.sampling import SamplingParams

from .conftest import CONTEXT, VOCAB, WINDOW

GREEDY = SamplingParams(max_new_tokens=40, temperature=0)


class PieceTokenizer:
    """id -> a fixed piece of text (1 or 2 letters); decode concatenates, like a SentencePiece vocabulary."""

    def __init__(self):
        self.pieces = [chr(97 + i % 26) + ("" if i < 40 else chr(65 + i % 26)) for i in range(VOCAB)]

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)


class ByteTokenizer:
    """id -> one byte; decode is UTF-8 with replacement, as byte-level tokenizers decode partial characters."""

    def __init__(self, table: bytes):
        self.table = table

    def decode(self, ids) -> str:
        return bytes(self.table[i] for i in ids).decode("utf-8", errors="replace")


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def _left_pad(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(r.shape[1] for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1]:] = r[0]
        mask[i, width - r.shape[1]:] = 1
    return ids, mask


# -- cached decode == full recompute ------------------------------------------------------------------------------


def test_fixture_model_is_not_degenerate(model, prompt, reference):
    """The invariants below are only meaningful if the tiny model's continuations vary."""
    out = reference(model, prompt(5), 40)
    assert len(set(out)) >= 10


@pytest.mark.parametrize("prompt_len", [5, 20])
@pytest.mark.parametrize("chunk", [1, 3, WINDOW, 13, 1024])
def test_cached_greedy_equals_full_recompute(model, prompt, reference, prompt_len, chunk):
    # 5 + 40 and 20 + 40 tokens cross the sliding window (8) during decode; 20 also crosses it within prefill.
    ids = prompt(prompt_len)
    assert generate_ids(model, ids, GREEDY, chunk_size=chunk) == [reference(model, ids, 40)]


def test_greedy_with_repetition_penalty_matches_transformers(model, prompt, reference):
    ids = prompt(6, seed=3)
    params = _greedy(30, repetition_penalty=1.8)
    assert generate_ids(model, ids, params, chunk_size=4) == [reference(model, ids, 30, penalty=1.8)]


# -- batches ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4, 1024])
def test_batched_left_padded_greedy_equals_one_by_one(model, prompt, chunk):
    rows = [prompt(n, seed=n) for n in (3, 9, 14)]
    ids, mask = _left_pad(rows)
    batched = generate_ids(model, ids, _greedy(25), attention_mask=mask, chunk_size=chunk)
    assert batched == [generate_ids(model, r, _greedy(25))[0] for r in rows]


def test_batched_repetition_penalty_ignores_padding(model, prompt):
    rows = [prompt(n, seed=n) for n in (3, 12)]
    params = _greedy(20, repetition_penalty=2.0)
    singles = [generate_ids(model, r, params)[0] for r in rows]
    # Pad with the short row's favourite token: penalising the padding would very likely change that row.
    pad = max(set(singles[0]), key=singles[0].count)
    ids, mask = _left_pad(rows, pad=pad)
    assert generate_ids(model, ids, params, attention_mask=mask) == singles


def test_batch_rows_stop_independently(model, prompt):
    rows = [prompt(n, seed=n) for n in (4, 7, 11)]
    free = [generate_ids(model, r, _greedy(30))[0] for r in rows]
    stop = free[1][5]  # row 1 stops at (or before) its 6th token; the others may run on
    expected = [f[:f.index(stop)] if stop in f else f for f in free]
    assert len(set(map(len, expected))) > 1
    ids, mask = _left_pad(rows)
    gens = generate_batch(model, ids, _greedy(30), PieceTokenizer(), {stop}, attention_mask=mask)
    assert [g.token_ids for g in gens] == expected
    assert [g.finish_reason for g in gens] == ["stop" if stop in f else "length" for f in free]
    assert [g.prompt_tokens for g in gens] == [4, 7, 11]


def test_right_padding_is_refused(model, prompt):
    ids, mask = _left_pad([prompt(3), prompt(6)])
    with pytest.raises(ValueError, match="pad batches on the left"):
        generate_ids(model, ids, GREEDY, attention_mask=mask.flip(-1))


# -- stopping -----------------------------------------------------------------------------------------------------


def test_stop_id_ends_generation_and_is_not_emitted(model, prompt):
    ids = prompt(5)
    free = generate_ids(model, ids, GREEDY)[0]
    stop = free[7]
    cut = free.index(stop)
    gen = generate(model, ids, GREEDY, PieceTokenizer(), stop_ids={stop})
    assert gen.token_ids == free[:cut]
    assert gen.text == PieceTokenizer().decode(free[:cut])
    assert (gen.finish_reason, gen.new_tokens, gen.prompt_tokens) == ("stop", cut + 1, 5)
    # the same stop id given through the params
    assert generate_ids(model, ids, _greedy(40, stop_token_ids=(stop,))) == [free[:cut]]


def test_max_new_tokens(model, prompt):
    gen = generate(model, prompt(5), _greedy(7), PieceTokenizer())
    assert (len(gen.token_ids), gen.new_tokens, gen.finish_reason) == (7, 7, "length")
    assert gen.prefill_seconds > 0 and gen.decode_seconds > 0


def test_stop_string_spanning_tokens(model, prompt):
    tok = PieceTokenizer()
    ids = prompt(5)
    free = generate_ids(model, ids, GREEDY)[0]
    stop = tok.decode(free[10:12]) + tok.decode(free[12:13])[:1]  # spans three tokens
    needed = next(n for n in range(1, 41) if stop in tok.decode(free[:n]))
    full = tok.decode(free)
    expected = full[:full.index(stop)]
    params = _greedy(40, stop=(stop, "never-seen"))
    it = stream(model, ids, params, tok)
    pieces = list(it)
    assert "".join(pieces) == expected == it.generation.text
    assert it.generation.token_ids == free[:needed]
    assert it.generation.finish_reason == "stop"
    assert generate_ids(model, ids, params, tokenizer=tok) == [free[:needed]]


def test_stop_string_completed_by_the_first_token(model, prompt):
    """The first token comes out of the prefill; a stop string it completes ends the row before a second token."""
    tok = PieceTokenizer()
    rows = [prompt(5), prompt(8, seed=2)]
    firsts = [generate_ids(model, r, _greedy(1))[0][0] for r in rows]
    ids, mask = _left_pad(rows)
    gens = generate_batch(model, ids, _greedy(20, stop=(tok.decode([firsts[0]]),)), tok, attention_mask=mask)
    assert gens[0].token_ids == [firsts[0]] and gens[0].finish_reason == "stop" and gens[0].text == ""
    assert gens[0].new_tokens == 1


def test_stop_strings_need_a_tokenizer(model, prompt):
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate_ids(model, prompt(5), _greedy(5, stop=("x",)))


# -- context ------------------------------------------------------------------------------------------------------


def test_prompt_filling_the_context_is_a_clear_error(model, prompt):
    with pytest.raises(ContextLengthError, match=f"{CONTEXT} tokens but the model's context holds {CONTEXT}"):
        generate_ids(model, prompt(CONTEXT), GREEDY)
    assert issubclass(ContextLengthError, ValueError)


def test_generation_is_capped_by_the_context(model, prompt, reference):
    ids = prompt(CONTEXT - 4)
    decoder = BatchGeneration(model, ids, _greedy(10))
    assert decoder.rows[0].budget == 4
    out = [step[0] for step in decoder]
    assert out == reference(model, ids, 4)
    assert decoder.finish_reasons == ["length"]
    assert generate_ids(model, prompt(CONTEXT - 1), _greedy(10)) == [reference(model, prompt(CONTEXT - 1), 1)]


def test_cache_is_sized_prompt_plus_new_tokens(model, prompt):
    assert BatchGeneration(model, prompt(5), _greedy(9)).rows[0].cache.max_len == 14


# -- sampling through the loop ------------------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible(model, prompt):
    ids, mask = _left_pad([prompt(4), prompt(9, seed=1)])
    params = SamplingParams(max_new_tokens=30, temperature=1.5, top_k=20, top_p=0.9, seed=7)
    first = generate_ids(model, ids, params, attention_mask=mask)
    assert generate_ids(model, ids, params, attention_mask=mask) == first
    other = generate_ids(model, ids, SamplingParams(max_new_tokens=30, temperature=1.5, top_k=20, top_p=0.9, seed=8),
                         attention_mask=mask)
    assert other != first
    assert first[0] != generate_ids(model, ids, _greedy(30), attention_mask=mask)[0]


# -- streaming detokenisation -------------------------------------------------------------------------------------


def _push_all(stream_: TextStream, ids) -> list[str]:
    return [stream_.push(i) for i in ids] + [stream_.finish()]


@pytest.mark.parametrize("tokenizer", ["fake", "tokenizers"])
def test_stream_never_splits_a_multibyte_character(tokenizer):
    text = "a😀bé€z"
    data = text.encode()
    if tokenizer == "fake":
        tok, ids = ByteTokenizer(bytes(range(256))), list(data)
    else:
        tok = _byte_level_tokenizer()
        ids = tok.encode(text).ids
        assert len(ids) == len(data)  # one token per byte
    pieces = _push_all(TextStream(tok), ids)
    assert [p for p in pieces if p] == ["a", "😀", "b", "é", "€", "z"]
    assert "".join(pieces) == tok.decode(ids) == text


def _byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def test_stream_of_generated_bytes_joins_to_the_decode(model, prompt):
    # Emoji and accent bytes mixed with ASCII: the model emits complete and broken UTF-8 sequences.
    table = (b"\xf0\x9f\x98\x80\xc3\xa9" + bytes(range(97, 123))) * 3
    tok = ByteTokenizer(table[:VOCAB])
    it = stream(model, prompt(5), _greedy(40), tok)
    pieces = list(it)
    assert "".join(pieces) == tok.decode(it.generation.token_ids) == it.generation.text
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])


def test_stream_holds_back_a_possible_stop_string():
    tok = PieceTokenizer()
    tok.pieces = ["x", "<", "/", "p", "s", ">", "ab</s>cd", "y"]
    s = TextStream(tok, stop=("</s>",))
    assert [s.push(i) for i in (0, 1, 2)] == ["x", "", ""]
    assert s.push(3) == "</p"  # "</p" cannot become "</s>" any more
    assert [s.push(i) for i in (1, 2, 4)] == ["", "", ""]
    assert s.push(5) == "" and s.stopped
    assert s.text == "x</p" and s.finish() == ""


def test_stream_stop_inside_one_token_and_earliest_stop_wins():
    tok = PieceTokenizer()
    tok.pieces = ["x", "<", "/", "p", "s", ">", "ab</s>cd", "y"]
    s = TextStream(tok, stop=("cd", "</s>"))
    assert _push_all(s, [7, 6]) == ["y", "ab", ""]
    assert s.text == "yab"
    unstopped = TextStream(tok, stop=("</s>",))
    assert "".join(_push_all(unstopped, [0, 1, 2])) == "x</"  # held text is released at the end


def test_stream_result_only_after_iteration(model, prompt):
    it = stream(model, prompt(5), _greedy(6), PieceTokenizer())
    assert it.generation is None
    text = "".join(it)
    assert it.generation.text == text and it.generation.new_tokens == 6


def test_one_prompt_functions_refuse_a_batch(model, prompt):
    ids, _ = _left_pad([prompt(3), prompt(3, seed=1)])
    with pytest.raises(ValueError, match="generate_batch"):
        generate(model, ids, GREEDY, PieceTokenizer())


def test_bad_chunk_size(model, prompt):
    with pytest.raises(ValueError, match="chunk_size"):
        generate_ids(model, prompt(5), GREEDY, chunk_size=0)


def test_stream_made_under_inference_mode_runs_outside_it(model, prompt):
    # A caller decorated with @torch.inference_mode() may return the stream; it is iterated after that returns.
    params = _greedy(8, repetition_penalty=1.5)
    with torch.inference_mode():
        it = stream(model, prompt(5), params, PieceTokenizer())
    text = "".join(it)
    with torch.inference_mode():
        assert text == generate(model, prompt(5), params, PieceTokenizer()).text


def test_include_stop_ids_keeps_the_stop_id_that_ended_each_row(model, prompt, reference):
    """Returned ids follow transformers: a row ended by a stop id ends with it (Model.generate pads after it)."""
    ids = prompt(10, seed=11)
    greedy = reference(model, ids, 6)
    stop = greedy[2]
    first = greedy.index(stop)  # the stop id may already occur earlier in the continuation
    params = SamplingParams(temperature=0.0, max_new_tokens=6)
    assert generate_ids(model, ids, params, [stop])[0] == greedy[:first]
    assert generate_ids(model, ids, params, [stop], include_stop_ids=True)[0] == greedy[:first + 1]
    assert generate_ids(model, ids, params, [], include_stop_ids=True)[0] == greedy  # ended by length: nothing added
