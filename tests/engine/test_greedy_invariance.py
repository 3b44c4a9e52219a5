"""A greedy answer is a function of the prompt alone: not of max_new_tokens (the cache's size), nor of the decode
path (the native step or the eager layers), on the real Gemma 3 270M where near-ties are common."""
from __future__ import annotations

import pytest
import torch

import gemma3n
from gemma3n.model import native_decode

PROMPTS = [[{"role": "user", "content": "hi"}], "The capital of France is", "def fibonacci(n):",
           "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def model():
    from gemma3n.cli import default_model_path
    return gemma3n.load(default_model_path())


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("prompt", PROMPTS[:2], ids=["chat-hi", "france"])
def test_greedy_answer_does_not_depend_on_max_new_tokens(model, prompt):
    """Every shorter budget gives a prefix of the longest answer (the sliding ring is sized by the budget)."""
    longest = model.generate(prompt, max_new_tokens=24, temperature=0)
    for n in range(1, 24):
        shorter = model.generate(prompt, max_new_tokens=n, temperature=0)
        assert longest.startswith(shorter), (n, shorter, longest)


def test_greedy_answer_is_the_same_on_the_native_step_and_the_eager_layers(model):
    def answers():
        return [model.generate(p, max_new_tokens=16, temperature=0) for p in PROMPTS]
    native = answers()
    native_decode.set_enabled(False)
    try:
        eager = answers()
    finally:
        native_decode.set_enabled(True)
    assert native == eager


@pytest.mark.parametrize("native", [True, False], ids=["native-step", "eager-layers"])
def test_logits_do_not_depend_on_the_cache_capacity(model, native):
    """Bit for bit: a short budget (a smaller sliding ring) computes exactly what a long one computes."""
    ids = torch.tensor([model.tokenizer.encode("The quick brown fox jumps over the lazy dog and", True)])
    lm = model.decoder

    def logits(budget: int) -> list[torch.Tensor]:
        """The prompt's last logits, then `budget - 1` greedy steps, on a cache sized prompt + budget."""
        with torch.inference_mode():
            cache = lm.new_cache(1, ids.shape[1] + budget)
            out = [lm(ids, cache=cache, last_only=True)[:, -1].float()]
            for _ in range(budget - 1):
                out.append(lm(out[-1].argmax(-1)[:, None], cache=cache, last_only=True)[:, -1].float())
        return out

    native_decode.set_enabled(native)
    try:
        longest = logits(12)
        for budget in (1, 2, 5):
            assert all(torch.equal(a, b) for a, b in zip(logits(budget), longest)), budget
    finally:
        native_decode.set_enabled(True)



def _decode_logits(model, prompts: list[torch.Tensor], steps: int) -> list[list[torch.Tensor]]:
    """Each prompt's logits for `steps` decode steps, run together in one ContinuousBatch (greedy)."""
    from gemma3n.engine.batch import ContinuousBatch
    from gemma3n.engine.sampling import SamplingParams
    batch = ContinuousBatch(model.decoder)
    seqs = [batch.add(p, SamplingParams(max_new_tokens=steps + 1, temperature=0)) for p in prompts]
    captured: dict[int, list[torch.Tensor]] = {id(s): [] for s in seqs}
    original = batch._sample

    def record(seq, logits):
        captured[id(seq)].append(logits.clone())
        return original(seq, logits)
    batch._sample = record
    while len(batch):
        batch.step()
    return [captured[id(s)] for s in seqs]


def test_a_row_computes_the_same_bits_in_any_batch(model):
    """The server's continuous batch: a row's logits at every step are bit-equal to the same prompt decoded alone,
    in a batch of 3 and of 20 (wider than the kernels' 16 rows: decoded as groups)."""
    prompts = [torch.tensor([model.tokenizer.encode(f"Item {i}: the number {7 * i} is", True)]) for i in range(20)]
    alone = [_decode_logits(model, [p], 3)[0] for p in prompts[:3]] + \
        [_decode_logits(model, [p], 3)[0] for p in prompts[17:]]
    for together in (_decode_logits(model, prompts[:3], 3), _decode_logits(model, prompts, 3)):
        rows = together[:3] + (together[17:] if len(together) == 20 else [])
        for row, (a, b) in enumerate(zip(alone, rows)):
            assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)), row
