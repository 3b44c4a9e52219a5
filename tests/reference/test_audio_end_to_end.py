"""End to end with our audio path: speech -> our features -> our audio tower (loaded lazily from the checkpoint)
-> the merge -> logits, against the reference `Gemma3nForConditionalGeneration` fed by its own feature extractor.

The image goes through the reference vision tower behind our tower interface until our vision tower lands.
"""
from __future__ import annotations

import numpy as np
import pytest
import soxr
import torch

import gemma3n
from gemma3n.model.audio import AudioEncoder
from gemma3n.processor.audio import load_audio
from gemma3n.processor.audio_features import AudioFeatureExtractor

from ..processor.audio_samples import encode, speech
from .test_multimodal_merge import ReferenceVision, _prompt
from .tiny import build_reference, save_reference

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = build_reference("multimodal", seed=21, scale=0.1)
    ours = gemma3n.load(save_reference(ref, tmp_path_factory.mktemp("mm-audio")))
    try:
        from gemma3n.model.vision import build_vision_tower  # noqa: F401  (ours, once it exists)
    except ImportError:
        ours.multimodal.set_tower_loader("vision", lambda: ReferenceVision(ref))
    return ref, ours


@pytest.fixture(scope="module")
def clips():
    """Two clips of different lengths (a padded batch): speech from an mp3 at 22.05 kHz, and a short tone."""
    samples, rate, _ = speech()
    spoken = load_audio(encode(soxr.resample(samples, rate, 22_050), 22_050, "mp3"))
    tone = (0.3 * np.sin(2 * np.pi * 330 * np.arange(11_000) / 16_000)).astype(np.float32)
    return [spoken[: 3 * 16_000], tone]


def test_audio_image_and_text_logits_equal_the_reference(pair, clips):
    ref, ours = pair
    ids = _prompt(images=1, clips=2, seed=3)
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    features, mask = AudioFeatureExtractor()(clips)
    ref_inputs = transformers.Gemma3nAudioFeatureExtractor()(clips, return_tensors="pt")
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels, input_features=ref_inputs["input_features"],
                   input_features_mask=ref_inputs["input_features_mask"]).logits
    got = ours.logits(ids, pixel_values=pixels, input_features=features, input_features_mask=mask)
    assert isinstance(ours.multimodal.tower("audio"), AudioEncoder)  # ours, built from model.audio_tower.*
    # 1e-4 on AVX-512 machines; on AVX2 ones PyTorch sums the towers' float32 reductions in another order and this
    # random tiny model amplifies that to 2.7e-4 at 41 of 334k logits (the same with the reference's features)
    torch.testing.assert_close(got, want.float(), rtol=1e-3, atol=1e-3)
    # the audio really matters: another clip changes the logits at the text after the audio
    other, other_mask = AudioFeatureExtractor()([clips[1], clips[0]])
    changed = ours.logits(ids, pixel_values=pixels, input_features=other, input_features_mask=other_mask)
    assert (changed - got).abs().amax() > 1e-3


def test_audio_only_prompt_equals_the_reference(pair, clips):
    ref, ours = pair
    ids = _prompt(images=0, clips=1, seed=8)
    features, mask = AudioFeatureExtractor()(clips[:1])
    with torch.no_grad():
        want = ref(input_ids=ids, input_features=features, input_features_mask=mask).logits
    torch.testing.assert_close(ours.logits(ids, input_features=features, input_features_mask=mask), want.float(),
                               rtol=1e-4, atol=1e-4)
