"""Prefix caching in the continuous batch: a prompt that begins like an earlier one (the next turn of a chat, a
shared system prompt) resumes from its K/V and prefills only the rest, and computes what a cold prefill computes:
the same greedy tokens, logprobs equal to float64 rounding. Tiny Gemma 3n (window 8, a KV-shared layer) and Gemma 3
(window 4) models, so every test crosses the sliding window."""
from __future__ import annotations

import pytest
import torch

from gemma3n.config import FULL, SLIDING, Gemma3TextConfig
from gemma3n.engine.batch import ContinuousBatch
from gemma3n.engine.prefix_cache import PrefixCache
from gemma3n.engine.sampling import SamplingParams
from gemma3n.model.gemma3 import Gemma3CausalLM

from .conftest import VOCAB, WINDOW

BIG = 1 << 30


def _greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, logprobs=3, **kw)


def _run(batch: ContinuousBatch, ids, params, **kw):
    """Generate one prompt alone in `batch`: (new ids, logprobs, the sequence)."""
    seq = batch.add(ids, params, **kw)
    out = []
    while len(batch):
        out += [t for s, t in batch.step() if s is seq and t is not None]
    return out, [(e.token, e.logprob, e.top) for e in seq.logprobs], seq


def _assert_same(cached, cold):
    assert cached[0] == cold[0]
    for (t1, lp1, top1), (t2, lp2, top2) in zip(cached[1], cold[1]):
        assert t1 == t2 and lp1 == pytest.approx(lp2, abs=1e-9)
        assert [i for i, _ in top1] == [i for i, _ in top2]


@pytest.fixture(scope="module")
def gemma3():
    """A tiny Gemma 3 decoder (window 4, two global layers), float64 with random weights: small embeddings and
    large layer weights, or the tied head would repeat the input token forever and hide cache bugs."""
    cfg = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
               num_attention_heads=2, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
               layer_types=[SLIDING, FULL, SLIDING, FULL], sliding_window=4, max_position_embeddings=128,
               final_logit_softcapping=30.0)
    torch.manual_seed(0)
    m = Gemma3CausalLM(Gemma3TextConfig.from_dict(cfg))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = 0.05 if "embed" in name else 1.0 if p.dim() == 1 else 3.0 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m.double().eval()


def test_fixtures_are_not_degenerate(lm, prompt):
    assert len(set(_run(ContinuousBatch(lm), prompt(13, seed=1), _greedy(30))[0])) >= 10


@pytest.fixture(params=["gemma3n", "gemma3"])
def lm(request, model, gemma3):
    return model if request.param == "gemma3n" else gemma3


@pytest.mark.parametrize("chunk", [3, 1024])
@pytest.mark.parametrize("answer", [5, 24])  # shorter and longer than the window: the decode ring wraps
def test_second_chat_turn_prefills_only_new_tokens(lm, prompt, chunk, answer):
    cache = PrefixCache(BIG)
    first = prompt(13, seed=1)  # longer than both windows: the prompt's own ring wraps while it is prefilled
    said, _, seq = _run(ContinuousBatch(lm, chunk, cache), first, _greedy(answer))
    assert seq.cached_tokens == 0 and len(said) == answer
    turn = torch.cat([first, torch.tensor([said]), prompt(6, seed=2)], 1)
    cached = _run(ContinuousBatch(lm, chunk, cache), turn, _greedy(8))
    cold = _run(ContinuousBatch(lm, chunk), turn, _greedy(8))
    # the answer's last token was sampled but never fed, so its K/V do not exist yet
    assert cached[2].cached_tokens == 13 + answer - 1
    _assert_same(cached, cold)
    stats = cache.stats()
    assert stats.hits == 1 and stats.hit_tokens == 13 + answer - 1 and stats.query_tokens == 13 + turn.shape[1]
    # a third turn resumes from the second, itself resumed: its entry joined the positions it was given to its own
    third = torch.cat([turn, torch.tensor([cached[0]]), prompt(4, seed=3)], 1)
    again, cold = _run(ContinuousBatch(lm, chunk, cache), third, _greedy(8)), _run(ContinuousBatch(lm, chunk), third,
                                                                                    _greedy(8))
    assert again[2].cached_tokens == turn.shape[1] + 8 - 1
    _assert_same(again, cold)


def test_shared_system_prompt_and_a_longer_match_cut_to_what_the_ring_holds(model, prompt):
    cache = PrefixCache(BIG)
    system = prompt(17, seed=4)
    a = torch.cat([system, prompt(5, seed=5)], 1)
    _run(ContinuousBatch(model, 4, cache), a, _greedy(30))
    b = torch.cat([system, prompt(6, seed=6)], 1)
    cached, cold = _run(ContinuousBatch(model, 4, cache), b, _greedy(15)), _run(ContinuousBatch(model, 4), b, _greedy(15))
    assert cached[2].cached_tokens == 17
    _assert_same(cached, cold)

    # An entry that only holds the ring's last WINDOW positions can resume exactly at its end, not before it.
    only_tail = PrefixCache(BIG)
    _run(ContinuousBatch(model, 4, only_tail), a, _greedy(30))
    (entry,) = [e for e in only_tail.entries.values() if e.length > a.shape[1]]
    entry.segments = [s for s in entry.segments if s.start > 0]  # as if the prompt's positions were gone
    longer = torch.cat([entry.tokens[None], prompt(3, seed=7)], 1)
    assert only_tail.lookup(entry.namespace, longer, WINDOW)[1] == entry.length
    assert only_tail.lookup(entry.namespace, b, WINDOW) is None  # needs positions the ring overwrote
    assert entry.resumable(entry.length - 1, WINDOW)[0] == 0


def test_same_prompt_again_and_sampling_are_unchanged(model, prompt):
    cache = PrefixCache(BIG)
    ids = prompt(12, seed=8)
    sampled = SamplingParams(max_new_tokens=20, temperature=1.1, top_k=30, seed=4, logprobs=2)
    first = _run(ContinuousBatch(model, 5, cache), ids, sampled)
    again = _run(ContinuousBatch(model, 5, cache), ids, sampled)
    assert again[2].cached_tokens == 11  # all but the last token, whose logits pick the first new one
    _assert_same(again, first)


def test_namespaces_and_media_keep_entries_apart(model, prompt):
    cache = PrefixCache(BIG)
    ids = prompt(14, seed=9)
    _run(ContinuousBatch(model, 4, cache), ids, _greedy(4), cache_key="adapter-a")
    assert _run(ContinuousBatch(model, 4, cache), ids, _greedy(4), cache_key="adapter-b")[2].cached_tokens == 0
    assert _run(ContinuousBatch(model, 4, cache), ids, _greedy(4), cache_key="adapter-a")[2].cached_tokens == 13
    # merged media embeddings without a key naming the media: never cached (the ids alone do not say which image)
    embeds = model.model.embed(ids)
    before = cache.stats()
    for _ in range(2):
        assert _run(ContinuousBatch(model, 4, cache), ids, _greedy(4), inputs_embeds=embeds)[2].cached_tokens == 0
    assert cache.stats().lookups == before.lookups and cache.stats().stored == before.stored
    # with a key (the server uses a digest of the media), the second identical request resumes
    keyed = [_run(ContinuousBatch(model, 4, cache), ids, _greedy(4), inputs_embeds=embeds, cache_key="img-1")
             for _ in range(2)]
    assert keyed[1][2].cached_tokens == 13
    _assert_same(keyed[1], keyed[0])


def test_budget_evicts_least_recently_used_and_zero_disables(model, prompt):
    probe = PrefixCache(BIG)
    _run(ContinuousBatch(model, 4, probe), prompt(10, seed=10), _greedy(3))
    one = max(e.nbytes for e in probe.entries.values())
    cache = PrefixCache(int(one * 2.5))
    prompts = [prompt(10, seed=s) for s in (10, 11, 12)]
    for ids in prompts[:2]:
        _run(ContinuousBatch(model, 4, cache), ids, _greedy(3))
    assert _run(ContinuousBatch(model, 4, cache), prompts[0], _greedy(3))[2].cached_tokens == 9  # 0 is now newest
    _run(ContinuousBatch(model, 4, cache), prompts[2], _greedy(3))  # evicts 1, the least recently used
    assert cache.bytes <= cache.budget and cache.stats().evictions >= 1
    assert _run(ContinuousBatch(model, 4, cache), prompts[1], _greedy(3))[2].cached_tokens == 0
    off = PrefixCache(0)
    for _ in range(2):
        assert _run(ContinuousBatch(model, 4, off), prompts[0], _greedy(3))[2].cached_tokens == 0
    assert not off.entries and off.stats().lookups == 0
    with pytest.raises(ValueError, match="budget"):
        PrefixCache(-1)


def test_siblings_share_one_prefill_and_each_equals_its_request_alone(lm, prompt):
    ids = prompt(13, seed=14)
    params = [SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=s, logprobs=1) for s in (7, 8, 9)]
    batch = ContinuousBatch(lm, 4)
    seq = batch.add(ids, params[0], siblings=params[1:])
    members = [seq] + seq.siblings
    assert len(batch) == 3
    got = {id(m): [] for m in members}
    chunks = 0
    while len(batch):
        chunks += bool(batch.prefilling)
        for s, t in batch.step():
            if t is not None:
                got[id(s)].append(t)
    assert chunks == 4  # 13 tokens in chunks of 4: prefilled once, not three times
    for member, p in zip(members, params):
        alone = _run(ContinuousBatch(lm, 4), ids, p)
        assert got[id(member)] == alone[0]
        assert [e.logprob for e in member.logprobs] == pytest.approx([x[1] for x in alone[1]], abs=1e-12)
    assert len({tuple(v) for v in got.values()}) > 1  # the seeds differ


def test_a_cancelled_first_choice_hands_its_prefill_to_the_next(model, prompt):
    ids = prompt(15, seed=15)
    batch = ContinuousBatch(model, 4)
    seq = batch.add(ids, _greedy(6), siblings=[_greedy(6), _greedy(6)])
    second, third = seq.siblings
    batch.step()  # the first chunk
    batch.finish(seq, "cancelled")
    batch.finish(third, "cancelled")
    out = []
    while len(batch):
        out += [t for s, t in batch.step() if s is second and t is not None]
    assert out == _run(ContinuousBatch(model, 4), ids, _greedy(6))[0]
    assert batch.cached_rows == 0 and not seq.done or seq.finish_reason == "cancelled"
