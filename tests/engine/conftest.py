"""Fixtures for the engine tests: a tiny random Gemma 3n decoder and its no-cache greedy reference, offline."""
from __future__ import annotations

import pytest
import torch

from gemma3n.config import TextConfig
from gemma3n.model.text import CausalLM

VOCAB = 96
WINDOW = 8
CONTEXT = 64

TINY = dict(
    vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, hidden_size=32, num_hidden_layers=4, intermediate_size=64,
    num_attention_heads=2, num_key_value_heads=1, head_dim=16, hidden_size_per_layer_input=8, laurel_rank=4,
    altup_num_inputs=2, sliding_window=WINDOW, num_kv_shared_layers=1, max_position_embeddings=CONTEXT,
    layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
    activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0], final_logit_softcapping=30.0,
)


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    """A 32-wide model gains nothing from intra-op threads, and on a busy 2-core machine their spinning made these
    tests 10x slower; restored afterwards for the other test packages."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def model() -> CausalLM:
    """Tiny model with re-randomised weights, in float64 so cached and uncached logits agree to ~1e-12.

    Norm scales are N(0, 1) rather than ~1: with the tied LM head, near-unit scales make the model repeat its
    input token forever, which would hide cache bugs. This seed gives varied continuations (checked in tests)."""
    torch.manual_seed(0)
    m = CausalLM(TextConfig.from_dict(TINY))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            scale = 1.0 if p.dim() == 1 else 3.0 / p.shape[-1] ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return m.double().eval()


@pytest.fixture(scope="session")
def prompt():
    """prompt(length, seed) -> (1, length) random ids that avoid id 0 (used as padding)."""
    def make(length: int, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + seed)
        return torch.randint(1, VOCAB, (1, length), generator=g)
    return make


@pytest.fixture(scope="session")
def reference():
    """reference(model, ids (1, T), n, penalty=None) -> n greedy ids, each the argmax of a full forward over the
    whole sequence with no cache (optionally after transformers' repetition penalty over prompt + new ids)."""
    def run(model, ids: torch.Tensor, n: int, penalty: float | None = None) -> list[int]:
        seq = ids.clone()
        out = []
        with torch.no_grad():
            for _ in range(n):
                logits = model(seq)[:, -1]
                if penalty is not None:
                    from transformers import RepetitionPenaltyLogitsProcessor
                    logits = RepetitionPenaltyLogitsProcessor(penalty)(seq, logits)
                nxt = logits.argmax(-1)
                out.append(int(nxt))
                seq = torch.cat([seq, nxt[:, None]], 1)
        return out
    return run
