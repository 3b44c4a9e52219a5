"""Sampling against transformers' own logits processors, seeded reproducibility, and the sampled distribution."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, \
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from gemma3n.engine.sampling import Sampler, SamplingParams, apply_repetition_penalty, greedy, min_p_filter, \
    top_k_candidates, top_p_filter

NEG_INF = float("-inf")


def _logits(seed: int, batch: int = 4, vocab: int = 1000, ties: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, vocab, generator=g) * 3
    # bf16-rounded logits (what a bf16 model's head gives) are full of exact ties
    return x.bfloat16().float() if ties else x


def _full(scores: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Compact (scores, ids) -> a (B, V) tensor with -inf outside the candidates."""
    return torch.full((scores.shape[0], vocab), NEG_INF).scatter(1, ids, scores)


def _reference(params: SamplingParams, logits: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """transformers' processor list for these params, in `_get_logits_processor` order."""
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature != 1.0:
        procs.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        procs.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        procs.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        procs.append(MinPLogitsWarper(params.min_p))
    return procs(previous, logits.clone())


# -- each filter == its transformers processor --------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_repetition_penalty_matches_transformers_and_ignores_padding(seed):
    logits = _logits(seed)
    g = torch.Generator().manual_seed(seed)
    previous = torch.randint(0, 1000, (4, 50), generator=g)  # with repeats
    pad = torch.tensor([0, 5, 17, 49])
    padded = previous.clone()
    padded[torch.arange(50)[None] < pad[:, None]] = -1
    for penalty in (0.7, 1.3):
        ours = apply_repetition_penalty(logits, padded, penalty)
        theirs = RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=pad)(previous, logits.clone())
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, logits)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("k", [1, 7, 64, 999, 5000])
def test_top_k_matches_transformers(k, ties):
    logits = _logits(k, ties=ties)
    scores, ids = top_k_candidates(logits, k)
    assert torch.equal(_full(scores, ids, 1000), TopKLogitsWarper(k)(None, logits))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.95, 0.999])
def test_top_p_matches_transformers(p, ties):
    logits = _logits(int(p * 1000), ties=ties)
    assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits))


@pytest.mark.parametrize("p", [0.0, 0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(p):
    logits = _logits(int(p * 100))
    assert torch.equal(min_p_filter(logits, p), MinPLogitsWarper(p)(None, logits))


COMBOS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=40),
    dict(temperature=1.0, top_k=64, top_p=0.95),  # Gemma 3n's generation_config.json
    dict(temperature=0.6, top_p=0.8),
    dict(temperature=1.3, top_k=100, top_p=0.9, min_p=0.05, repetition_penalty=1.2),
    dict(temperature=0.8, min_p=0.1, repetition_penalty=0.9),
    dict(temperature=1.0, top_k=3, top_p=0.5),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampler_pipeline_matches_transformers(combo, ties):
    params = SamplingParams(**combo)
    logits = _logits(len(str(combo)), ties=ties)
    previous = torch.randint(0, 1000, (4, 30), generator=torch.Generator().manual_seed(1))
    scores, ids = Sampler(params).candidates(logits, previous)
    ours = _full(scores, ids, 1000)
    theirs = _reference(params, logits, previous)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))  # the same kept tokens
    kept = torch.isfinite(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=0, atol=0)


def test_greedy_is_argmax_of_penalised_logits():
    logits = _logits(5)
    previous = logits.argmax(-1, keepdim=True)  # penalising the best token must change the choice
    params = SamplingParams(temperature=0, top_k=1, repetition_penalty=3.0)
    chosen = Sampler(params).sample(logits, previous)
    assert torch.equal(chosen, _reference(SamplingParams(repetition_penalty=3.0), logits, previous).argmax(-1))
    assert not torch.equal(chosen, logits.argmax(-1))
    assert torch.equal(Sampler(SamplingParams(temperature=0)).sample(logits), logits.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_greedy_picks_what_torch_argmax_picks(dtype):
    """Ties (the first wins), NaN (above everything), rows of -inf, a vocabulary-wide row, a non-contiguous view:
    the same index as torch.argmax, as int64."""
    logits = _logits(7, batch=6, vocab=262144, ties=True).to(dtype)
    logits[1, 9] = logits[1, 100_000] = logits[1].max() + 1  # a tie at the top: the first
    logits[2, 50_000] = float("nan")
    logits[2, 70_000] = float("nan")
    logits[2, 10] = float("inf")
    logits[3] = NEG_INF
    logits[4, 262_143] = float("inf")
    for scores in (logits, logits[:, ::2], logits[::2]):
        chosen = greedy(scores)
        assert chosen.dtype == torch.int64
        assert torch.equal(chosen, scores.argmax(-1))
    assert chosen.tolist() == [scores[0].argmax().item(), 50_000, 262_143]


# -- randomness ---------------------------------------------------------------------------------------------------


def _draws(params: SamplingParams, logits: torch.Tensor, steps: int) -> list[list[int]]:
    sampler = Sampler(params)
    return [sampler.sample(logits).tolist() for _ in range(steps)]


def test_seeded_sampling_is_reproducible():
    logits = _logits(0)
    params = SamplingParams(temperature=1.5, top_k=50, seed=123)
    assert _draws(params, logits, 30) == _draws(params, logits, 30)
    assert _draws(params, logits, 30) != _draws(SamplingParams(temperature=1.5, top_k=50, seed=124), logits, 30)
    # the full-vocabulary path (no top-k) too
    params = SamplingParams(temperature=1.5, seed=9)
    assert _draws(params, logits, 30) == _draws(params, logits, 30)


# 99.9% quantiles of the chi-square distribution by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}


@pytest.mark.parametrize("combo", [dict(temperature=0.8, top_k=6, top_p=0.9), dict(top_p=0.85),
                                   dict(temperature=2.0, min_p=0.15), dict(temperature=0.5)])
def test_samples_follow_the_filtered_distribution(combo):
    vocab, n = 10, 40_000
    logits = torch.linspace(-2.0, 2.0, vocab)[torch.randperm(vocab, generator=torch.Generator().manual_seed(0))]
    params = SamplingParams(seed=2024, **combo)
    expected = _reference(params, logits[None], None).softmax(-1)[0]
    # one call with n identical rows = n independent draws
    counts = torch.bincount(Sampler(params).sample(logits.expand(n, vocab)), minlength=vocab).double()
    kept = expected > 0
    assert counts[~kept].sum() == 0  # never a filtered token
    assert int(kept.sum()) >= 3
    chi2 = ((counts[kept] - n * expected[kept]) ** 2 / (n * expected[kept])).sum()
    assert chi2 < CHI2_999[int(kept.sum()) - 1]


def test_sample_rejects_a_sequence_of_logits():
    with pytest.raises(ValueError, match="batch, vocab"):
        Sampler(SamplingParams()).sample(torch.zeros(1, 2, 5))


# -- params -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", -1), ("top_k", 1.0), ("top_p", 1.5), ("top_p", -0.1), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("seed", -1), ("seed", "7"), ("stop", ("",)), ("stop", (3,)), ("stop_token_ids", (-1,)), ("stop_token_ids", ("1",)),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_params_normalise_sequences():
    p = SamplingParams(stop=["a", "b"], stop_token_ids=[1, 106])
    assert (p.stop, p.stop_token_ids) == (("a", "b"), (1, 106))
    assert SamplingParams(stop="END", stop_token_ids=1).stop == ("END",)
    assert hash(p) == hash(SamplingParams(stop=("a", "b"), stop_token_ids=(1, 106)))
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


GEMMA_3N_GENERATION_CONFIG = {"bos_token_id": 2, "cache_implementation": "hybrid", "do_sample": True,
                              "eos_token_id": [1, 106], "pad_token_id": 0, "top_k": 64, "top_p": 0.95}


def test_from_generation_config_gemma(tmp_path):
    p = SamplingParams.from_generation_config(GEMMA_3N_GENERATION_CONFIG)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.stop_token_ids) == (1.0, 64, 0.95, 0.0, (1, 106))
    (tmp_path / "generation_config.json").write_text(json.dumps(GEMMA_3N_GENERATION_CONFIG))
    assert SamplingParams.from_generation_config(tmp_path) == p
    assert SamplingParams.from_generation_config(tmp_path / "generation_config.json") == p
    assert SamplingParams.from_generation_config(str(tmp_path), seed=3, top_k=10) == \
        SamplingParams(top_k=10, top_p=0.95, stop_token_ids=(1, 106), seed=3)


def test_from_generation_config_follows_transformers_defaults():
    # do_sample absent or false -> greedy (the warpers are ignored); sampling without top_k -> transformers' 50
    assert SamplingParams.from_generation_config({"temperature": 0.3, "top_k": 5, "eos_token_id": 1}) == \
        SamplingParams(temperature=0, stop_token_ids=(1,))
    p = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.7, "top_p": None,
                                               "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 99})
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.max_new_tokens, p.stop_token_ids) == \
        (0.7, 50, 1.0, 0.05, 1.1, 99, ())


def test_from_generation_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        SamplingParams.from_generation_config(tmp_path)
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SamplingParams.from_generation_config(tmp_path)
    with pytest.raises(ValueError, match="unknown field"):
        SamplingParams.from_generation_config({}, temprature=0.5)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_generation_config({"do_sample": True, "top_p": 3})
