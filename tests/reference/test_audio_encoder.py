"""The audio tower against transformers' Gemma3nAudioEncoder (randomised weights), whole and block by block."""
from __future__ import annotations

import pytest
import torch
from transformers import Gemma3nAudioConfig
from transformers.initialization import no_init_weights
from transformers.models.gemma3n import modeling_gemma3n as ref

from gemma3n.model.audio import (AudioConfig, ConformerAttention, ConformerBlock, ConformerFeedForward,
                                 CumulativeGroupNorm, LightConv1d, SubsampleConvProjection, build_audio_tower)

from .tiny import randomize

# Tiny: 2 heads, context 5 left / 2 right (the released model has no right context: this tests the general rule),
# chunk 4 so that several chunks and a ragged last chunk occur, asymmetric SSCP strides.
TINY = dict(hidden_size=32, input_feat_size=16, conf_num_attention_heads=2, conf_num_hidden_layers=2,
            conf_attention_chunk_size=4, conf_attention_context_left=5, conf_attention_context_right=2,
            conf_conv_kernel_size=3, conf_reduction_factor=2, sscp_conv_channel_size=[8, 4],
            sscp_conv_stride_size=[[2, 2], [1, 2]])
# The released E2B / E4B audio tower (architecture.md 8.1) with 2 of its 12 identical blocks.
E2B_TWO_BLOCKS = dict(conf_num_hidden_layers=2)
TOL = dict(atol=2e-5, rtol=1e-4)


def _pair(overrides: dict, seed: int, scale: float):
    cfg = Gemma3nAudioConfig(**overrides)
    with no_init_weights():  # every parameter is overwritten by randomize: skip the slow default init
        reference = randomize(ref.Gemma3nAudioEncoder(cfg), seed, scale)
    with torch.device("meta"):  # as the checkpoint loader does it
        ours = build_audio_tower(cfg.to_dict()).eval()
    ours.load_state_dict(reference.state_dict(), strict=True, assign=True)
    return cfg, reference, ours


def _batch(cfg, lengths: list[int], seed: int):
    """Log-mel-like features, right padding with the feature value of padded audio (log 1e-5) as the extractor."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), max(lengths), cfg.input_feat_size, generator=g) - 4
    valid = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return features.masked_fill(~valid[..., None], torch.log(torch.tensor(1e-5))), valid


@pytest.mark.parametrize("overrides, lengths, scale", [
    (TINY, [37, 50, 9], 0.3),
    (TINY, [1], 0.3),
    (E2B_TWO_BLOCKS, [300, 211], 0.05),
])
def test_encoder_equals_reference_with_padded_clips(overrides, lengths, scale):
    cfg, reference, ours = _pair(overrides, seed=7, scale=scale)
    features, valid = _batch(cfg, lengths, seed=1)
    with torch.no_grad():
        expected = reference(features, ~valid)
        got, got_mask = ours(features, ~valid)
    assert torch.equal(got_mask, expected.audio_mel_mask)
    torch.testing.assert_close(got, expected.last_hidden_state, **TOL)
    assert got.abs().amax() > 0.1  # not trivially equal


@pytest.mark.slow
def test_full_e2b_audio_tower_equals_reference():
    cfg, reference, ours = _pair({}, seed=3, scale=0.02)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    features, valid = _batch(cfg, [240, 157], seed=2)
    with torch.no_grad():
        expected = reference(features, ~valid)
        got, got_mask = ours(features, ~valid)
    assert got.shape == (2, 15, 1536) and torch.equal(got_mask, expected.audio_mel_mask)
    torch.testing.assert_close(got, expected.last_hidden_state, **TOL)


def _copy(ours, reference):
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval()


@pytest.fixture(scope="module")
def tiny():
    return Gemma3nAudioConfig(**TINY)


def _hidden(cfg, t=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t, cfg.hidden_size, generator=g)
    mask = torch.arange(t)[None, :] >= torch.tensor([t, t - 9])[:, None]  # True = padding
    return x, mask


def test_cumulative_group_norm(tiny):
    reference = randomize(ref.Gemma3nAudioCumulativeGroupNorm(4, (6,), eps=1e-3), 0)
    ours = _copy(CumulativeGroupNorm(4, eps=1e-3), reference)
    x = torch.randn(2, 11, 6, 4) * 3 + 1
    torch.testing.assert_close(ours(x), reference(x), **TOL)


def test_subsample_conv_projection(tiny):
    reference = randomize(ref.Gemma3nAudioSubSampleConvProjection(tiny), 1)
    ours = _copy(SubsampleConvProjection(AudioConfig.from_dict(tiny.to_dict())), reference)
    x = torch.randn(2, 19, tiny.input_feat_size)
    torch.testing.assert_close(ours(x), reference(x), **TOL)


def test_feed_forward(tiny):
    reference = randomize(ref.Gemma3nAudioConformerFeedForward(tiny), 2)
    ours = _copy(ConformerFeedForward(tiny.hidden_size, tiny.conf_residual_weight, tiny.gradient_clipping),
                 reference)
    x, _ = _hidden(tiny)
    torch.testing.assert_close(ours(x), reference(x), **TOL)


def test_attention_on_valid_frames(tiny):
    reference = randomize(ref.Gemma3nAudioConformerAttention(tiny), 3)
    ours = _copy(ConformerAttention(AudioConfig.from_dict(tiny.to_dict())), reference)
    x, mask = _hidden(tiny)
    # Padded query frames see no valid key; both sides give them arbitrary values the block then zeroes.
    torch.testing.assert_close(ours(x, mask)[~mask], reference(x, mask)[~mask], **TOL)


def test_light_conv(tiny):
    reference = randomize(ref.Gemma3nAudioConformerLightConv1d(tiny), 4)
    ours = _copy(LightConv1d(tiny.hidden_size, tiny.conf_conv_kernel_size, tiny.rms_norm_eps,
                             tiny.gradient_clipping), reference)
    x, _ = _hidden(tiny)
    torch.testing.assert_close(ours(x), reference(x), **TOL)


def test_conformer_block(tiny):
    reference = randomize(ref.Gemma3nAudioConformerBlock(tiny), 5)
    ours = _copy(ConformerBlock(AudioConfig.from_dict(tiny.to_dict())), reference)
    x, mask = _hidden(tiny)
    torch.testing.assert_close(ours(x, mask), reference(x, mask), **TOL)


@pytest.mark.parametrize("every", [2, 4])
def test_last_block_computes_only_the_frames_kept(tiny, every):
    """The tower's last block runs its end FFW and norm on every reduction_factor-th frame only (they work frame by
    frame): those frames are the reference block's, and the block's end FFW sees only them."""
    reference = randomize(ref.Gemma3nAudioConformerBlock(tiny), 5)
    ours = _copy(ConformerBlock(AudioConfig.from_dict(tiny.to_dict())), reference)
    x, mask = _hidden(tiny)
    rows = []
    ours.ffw_layer_end.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[1]))
    torch.testing.assert_close(ours(x, mask, keep_every=every), reference(x, mask)[:, ::every], **TOL)
    assert rows == [-(-x.shape[1] // every)]


def test_builds_on_meta_device_with_checkpoint_keys():
    with torch.device("meta"):
        tower = build_audio_tower(Gemma3nAudioConfig().to_dict())  # the released sizes
        reference = ref.Gemma3nAudioEncoder(Gemma3nAudioConfig())
    ours = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert len(ours) == 5 + 12 * 22 and ours["conformer.0.lconv1d.depthwise_conv1d.weight"] == (1536, 1, 5)
    assert all(t.is_meta for t in tower.state_dict().values())


def test_missing_config_key_is_a_clear_error():
    cfg = Gemma3nAudioConfig().to_dict()
    del cfg["conf_attention_context_left"]
    with pytest.raises(ValueError, match="conf_attention_context_left"):
        build_audio_tower(cfg)


def _as_loaded_in_bf16(reference):
    """The reference as from_pretrained(dtype=bfloat16) leaves it: weights, q_scale and the clip bound in bf16,
    the timescales and the soft-cap still float32 (checked on a saved tiny checkpoint)."""
    reference.to(torch.bfloat16)
    for module in reference.modules():
        if isinstance(module, ref.Gemma3nAudioRelativePositionEmbedding):
            n = module.channels // 2
            step = torch.log(torch.tensor(1.0e4)).item() / max(n - 1, 1)
            module.inv_timescales = torch.exp(torch.arange(n) * -step).float()[None, None]
        if isinstance(module, ref.Gemma3nAudioAttention):
            module.softcap = module.softcap.float()
    return reference


def test_bfloat16_encoder_equals_reference():
    cfg, reference, ours = _pair(dict(TINY, hidden_size=64), seed=9, scale=0.1)
    _as_loaded_in_bf16(reference)
    ours.to(torch.bfloat16)
    features, valid = _batch(cfg, [41, 30], seed=4)
    with torch.no_grad():
        expected = reference(features.bfloat16(), ~valid).last_hidden_state
        got, _ = ours(features.bfloat16(), ~valid)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected)  # same roundings in the same places: bit-identical
