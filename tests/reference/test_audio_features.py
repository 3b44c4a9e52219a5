"""The log-mel extractor against transformers' Gemma3nAudioFeatureExtractor (the reference), on synthetic signals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3nAudioFeatureExtractor

from gemma3n.processor.audio_features import AudioFeatureExtractor


def _signal(n: int, seed: int) -> np.ndarray:
    """Chirp + harmonics + noise with silences: exercises every mel band and the log floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16_000
    x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t) + 0.1 * np.sin(2 * np.pi * 3100 * t)
    x += 0.05 * rng.standard_normal(n)
    x[n // 3: n // 3 + 800] = 0.0
    return x.astype(np.float32)


def _reference(clips, **kwargs):
    out = Gemma3nAudioFeatureExtractor(**kwargs)(clips, return_tensors="pt")
    return out["input_features"], out["input_features_mask"]


@pytest.mark.parametrize("lengths", [[16_000], [513], [1000, 24_321, 7_777], [480_000 + 5_000, 30_000]])
def test_features_and_masks_equal_reference(lengths):
    clips = [_signal(n, seed=i) for i, n in enumerate(lengths)]
    ours, ours_mask = AudioFeatureExtractor()(clips)
    ref, ref_mask = _reference(clips)
    assert ours.dtype == torch.float32 and ours_mask.dtype == torch.bool
    assert ours.shape == ref.shape and ours.shape[-1] == 128
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours_mask, ref_mask)


def test_thirty_seconds_gives_2997_frames_and_longer_clips_are_cut():
    feats, mask = AudioFeatureExtractor()([_signal(40 * 16_000, 3)])
    assert feats.shape == (1, 2997, 128) and bool(mask.all())


def test_float64_input_and_non_default_config_equal_reference():
    cfg = dict(feature_size=64, min_frequency=60.0, max_frequency=7000.0, preemphasis=0.9,
               preemphasis_htk_flavor=False, fft_overdrive=False, mel_floor=1e-3,
               per_bin_mean=list(np.linspace(-1, 1, 64)), per_bin_stddev=list(np.linspace(0.5, 2, 64)))
    clips = [_signal(9_000, 5).astype(np.float64), _signal(4_000, 6).astype(np.float64)]
    ours, ours_mask = AudioFeatureExtractor.from_config(cfg)(clips)
    ref, ref_mask = _reference(clips, **cfg)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert torch.equal(ours_mask, ref_mask)


def test_from_config_ignores_bookkeeping_keys_and_rejects_dither():
    cfg = {"feature_extractor_type": "Gemma3nAudioFeatureExtractor", "processor_class": "Gemma3nProcessor",
           "return_attention_mask": True, "feature_size": 128, "sampling_rate": 16000, "dither": 0.0}
    assert AudioFeatureExtractor.from_config(cfg) == AudioFeatureExtractor()
    with pytest.raises(ValueError, match="dither"):
        AudioFeatureExtractor.from_config({"dither": 1e-4})


def test_clear_errors_for_bad_clips():
    extract = AudioFeatureExtractor()
    with pytest.raises(ValueError, match="too short"):
        extract([np.zeros(100, np.float32)])
    with pytest.raises(ValueError, match="1-D"):
        extract([np.zeros((2, 1000), np.float32)])
    with pytest.raises(ValueError, match="load_audio"):
        extract([np.zeros(1000, np.int16)])
