"""Continuous batching: sequences that join and leave a running batch give what each gives alone."""
from __future__ import annotations

import pytest
import torch

from gemma3n.engine.batch import ContinuousBatch
from gemma3n.engine.generate import ContextLengthError, generate_ids
from gemma3n.engine.sampling import SamplingParams

from .conftest import CONTEXT, WINDOW


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, **kw)


def _run(batch: ContinuousBatch, arrivals: dict[int, list], limit: int = 500) -> dict[int, list[int]]:
    """Add (key, ids, params, stop_ids) at the given step numbers; step until all are done; new ids per key."""
    seqs, tokens = {}, {}
    for step in range(limit):
        for key, ids, params, stop_ids in arrivals.get(step, []):
            seqs[key] = batch.add(ids, params, stop_ids)
            tokens[key] = []
        for seq, token in batch.step():
            key = next(k for k, s in seqs.items() if s is seq)
            if token is not None:
                tokens[key].append(token)
        if step > max(arrivals) and not len(batch):
            return tokens
    raise AssertionError("the batch did not finish")


def test_rows_joining_at_different_steps_equal_each_row_alone(model, prompt):
    # Prompts shorter and longer than the window, longer than a chunk, arriving while others decode.
    lengths = {0: 3, 1: 12, 2: 5, 3: 20, 4: 9, 5: 2}
    starts = {0: 0, 1: 0, 2: 2, 3: 5, 4: 5, 5: 17}
    budgets = {0: 30, 1: 18, 2: 25, 3: 12, 4: 40, 5: 6}
    arrivals: dict[int, list] = {}
    for key, n in lengths.items():
        arrivals.setdefault(starts[key], []).append((key, prompt(n, seed=key), _greedy(budgets[key]), ()))
    got = _run(ContinuousBatch(model, chunk_size=4), arrivals)
    for key, n in lengths.items():
        alone = generate_ids(model, prompt(n, seed=key), _greedy(budgets[key]), chunk_size=4)[0]
        assert got[key] == alone, f"sequence {key}"
    assert max(lengths.values()) > WINDOW and len(set(map(len, got.values()))) > 3


def test_seeded_sampling_and_repetition_penalty_equal_alone(model, prompt):
    sampled = SamplingParams(max_new_tokens=25, temperature=1.3, top_k=20, top_p=0.9, seed=5)
    penalised = _greedy(25, repetition_penalty=1.5)
    arrivals = {0: [("a", prompt(6, seed=1), sampled, ())], 3: [("b", prompt(10, seed=2), penalised, ())]}
    got = _run(ContinuousBatch(model), arrivals)
    assert got["a"] == generate_ids(model, prompt(6, seed=1), sampled)[0]
    assert got["b"] == generate_ids(model, prompt(10, seed=2), penalised)[0]


def test_stop_ids_and_finish_reasons(model, prompt):
    free = generate_ids(model, prompt(5), _greedy(30))[0]
    stop = free[6]
    batch = ContinuousBatch(model)
    stopping = batch.add(prompt(5), _greedy(30), {stop})
    running = batch.add(prompt(7, seed=3), _greedy(4))
    while len(batch):
        batch.step()
    assert stopping.new_ids == free[:free.index(stop)] and stopping.finish_reason == "stop"
    assert stopping.sampled == free.index(stop) + 1
    assert (running.finish_reason, len(running.new_ids)) == ("length", 4)
    assert stopping.prefill_seconds > 0 and running.decode_seconds > 0


def test_finished_rows_leave_and_free_the_cache(model, prompt):
    batch = ContinuousBatch(model)
    seqs = [batch.add(prompt(4 + i, seed=i), _greedy(50)) for i in range(3)]
    for _ in range(6):
        batch.step()
    assert batch.cached_rows == 3 and len(batch) == 3
    batch.finish(seqs[1], "cancelled")
    batch.step()
    assert batch.cached_rows == 2 and seqs[1].finish_reason == "cancelled"
    assert batch.decoding == [seqs[0], seqs[2]]
    # The remaining rows continue exactly as they would alone.
    while len(batch):
        batch.step()
    assert seqs[2].new_ids == generate_ids(model, prompt(6, seed=2), _greedy(50))[0]
    assert batch.cached_rows == 0 and batch.groups == []


def test_cancel_while_prefilling(model, prompt):
    batch = ContinuousBatch(model, chunk_size=2)
    seq = batch.add(prompt(9), _greedy(5))
    batch.step()
    batch.finish(seq, "cancelled")
    assert batch.step() == [] and len(batch) == 0 and seq.cache is None


def test_context_is_checked_when_added(model, prompt):
    batch = ContinuousBatch(model)
    with pytest.raises(ContextLengthError):
        batch.add(prompt(CONTEXT), _greedy(5))
    seq = batch.add(prompt(CONTEXT - 3), _greedy(50))
    while len(batch):
        batch.step()
    assert (seq.finish_reason, len(seq.new_ids)) == ("length", 3)
    with pytest.raises(ValueError, match="one prompt"):
        batch.add(torch.ones(2, 3, dtype=torch.long), _greedy(5))


def test_prompt_embeddings_are_fed_like_the_decoder_feeds_them(model, prompt):
    # Stand-in for a media merge: perturbed embeddings for part of the prompt, prefilled across chunks.
    ids = prompt(11, seed=4)
    with torch.no_grad():
        embeds = model.model.embed(ids)
        embeds[:, 3:7] += torch.randn(embeds[:, 3:7].shape, generator=torch.Generator().manual_seed(0),
                                      dtype=embeds.dtype)
    alone = generate_ids(model, ids, _greedy(20), inputs_embeds=embeds, chunk_size=4)[0]
    assert alone != generate_ids(model, ids, _greedy(20), chunk_size=4)[0]  # the embeddings matter
    batch = ContinuousBatch(model, chunk_size=4)
    other = batch.add(prompt(5), _greedy(20))
    batch.step()
    media = batch.add(ids, _greedy(20), inputs_embeds=embeds)
    while len(batch):
        batch.step()
    assert media.new_ids == alone and other.new_ids == generate_ids(model, prompt(5), _greedy(20))[0]
    with pytest.raises(ValueError, match="inputs_embeds"):
        batch.add(ids, _greedy(5), inputs_embeds=embeds[:, :5])
