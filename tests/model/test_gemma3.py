"""Gemma 3 text decoder: parity with transformers' Gemma3ForCausalLM on seeded tiny configs, and cache invariants."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gemma3n.config import FULL, SLIDING, Gemma3TextConfig  # noqa: E402
from gemma3n.model.gemma3 import Gemma3CausalLM  # noqa: E402

RTOL = 1e-4  # fp32 logits, relative to the largest reference logit
WINDOW = 4
SEQ = 13  # longer than the sliding window, so sliding and global layers differ


def tiny_hf_config(attn_softcap=None, final_softcap=None, rope_factor=None) -> dict:
    full = {"rope_type": "default", "rope_theta": 10_000.0}
    if rope_factor is not None:
        full = {"rope_type": "linear", "factor": rope_factor, "rope_theta": 10_000.0}
    return dict(
        model_type="gemma3_text", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=5,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        layer_types=[SLIDING, FULL, SLIDING, SLIDING, FULL], sliding_window=WINDOW, rms_norm_eps=1e-6,
        rope_parameters={FULL: full, SLIDING: {"rope_type": "default", "rope_theta": 100.0}},
        attn_logit_softcapping=attn_softcap, final_logit_softcapping=final_softcap, max_position_embeddings=256,
    )


def build_pair(hf: dict, seed: int = 0):
    """(reference, ours) with every parameter randomised, norms included, and ours loaded strictly on meta."""
    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in hf.items() if k != "model_type"},
                                        attn_implementation="eager")
    torch.manual_seed(seed)
    ref = transformers.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    with torch.device("meta"):
        ours = Gemma3CausalLM(Gemma3TextConfig.from_dict(hf))
    sd = {k: v for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied to embed_tokens
    ours.load_state_dict(sd, assign=True, strict=True)
    return ref, ours.eval()


def left_padded_batch(vocab: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is a shorter prompt, left padded
    return ids, mask


def reference_logits(ref, ids, mask):
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # real-token positions, as generate() builds them
    with torch.no_grad():
        return ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float()


def assert_rel_close(ours, ref, mask=None):
    if mask is not None:
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err < RTOL, f"max relative difference {err:.2e}"


@pytest.mark.parametrize("attn_softcap, final_softcap, rope_factor", [
    (None, None, None),
    (None, 30.0, 8.0),
    (20.0, 5.0, None),  # the reference ignores attn_logit_softcapping; so must we
])
def test_logits_match_reference(attn_softcap, final_softcap, rope_factor):
    hf = tiny_hf_config(attn_softcap, final_softcap, rope_factor)
    ref, ours = build_pair(hf)
    ids, mask = left_padded_batch(hf["vocab_size"])
    expected = reference_logits(ref, ids, mask)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    assert got.dtype == torch.float32
    assert_rel_close(got, expected, mask)
    with torch.no_grad():  # the left-padded row computes what the same prompt computes alone
        alone = ours(ids[1:, 3:])
    assert_rel_close(alone[0], got[1, 3:])


def test_rope_scaling_and_final_softcap_change_the_output():
    """Guards the parity test above against configs whose options are silently no-ops."""
    ids, mask = left_padded_batch(97)
    outs = []
    for kwargs in ({}, {"rope_factor": 8.0}, {"final_softcap": 2.0}):
        _, ours = build_pair(tiny_hf_config(**kwargs))
        with torch.no_grad():
            outs.append(ours(ids, attention_mask=mask))
    assert (outs[0] - outs[1]).abs().max() > 1e-3
    assert outs[2].abs().max() <= 2.0 and (outs[0] - outs[2]).abs().max() > 1e-3


def test_cached_steps_equal_full_forward():
    """Prefill, a multi-token chunk, then single tokens across the window boundary == one full forward."""
    hf = tiny_hf_config(final_softcap=30.0, rope_factor=4.0)
    _, ours = build_pair(hf)
    ids, mask = left_padded_batch(hf["vocab_size"], seed=2)
    with torch.no_grad():
        full = ours(ids, attention_mask=mask)
        cache = ours.new_cache(batch=2, max_len=SEQ)
        pieces = [ours(ids[:, :5], mask[:, :5], cache=cache), ours(ids[:, 5:8], mask[:, 5:8], cache=cache)]
        for t in range(8, SEQ):
            pieces.append(ours(ids[:, t:t + 1], mask[:, t:t + 1], cache=cache, last_only=True))
    stepped = torch.cat(pieces, dim=1)
    assert_rel_close(stepped, full, mask)


def test_last_only_and_cache_layout():
    hf = tiny_hf_config()
    _, ours = build_pair(hf)
    ids, _ = left_padded_batch(hf["vocab_size"])
    with torch.no_grad():
        last = ours(ids, last_only=True)
        full = ours(ids)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    cache = ours.new_cache(batch=2, max_len=32)
    capacities = [slot.k.shape[2] for slot in cache.slots]
    assert capacities == [WINDOW if t == SLIDING else 32 for t in hf["layer_types"]]


def test_unsupported_activation_is_a_clear_error():
    hf = dict(tiny_hf_config(), hidden_activation="relu")
    with pytest.raises(ValueError, match="hidden_activation"):
        Gemma3CausalLM(Gemma3TextConfig.from_dict(hf))
