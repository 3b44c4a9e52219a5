"""End to end with our own vision tower: a tiny-text Gemma3nForConditionalGeneration with a real MobileNet-V5
(base table) tower, a prompt holding two images, pixels from our ImageProcessor: our logits equal the reference's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import gemma3n
from gemma3n.processor.image import ImageProcessor

from .tiny import TINY_MEDIA_TOKENS as TOK

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from .tiny import build_reference, save_reference
    torch.manual_seed(0)
    ref = build_reference("multimodal", seed=11, scale=0.1)
    folder = save_reference(ref, tmp_path_factory.mktemp("mm_vision"))
    return ref, gemma3n.load(folder)  # the vision tower is ours, built from the checkpoint on first use


def two_images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (120, 400, 4), dtype=np.uint8), "RGBA")]


def test_two_images_give_the_reference_logits(pair):
    ref, ours = pair
    # 256 px keeps the test quick; the tower's 768 px parity is tested in tests/model/test_vision.py.
    pixels = ImageProcessor(height=256, width=256)(two_images())
    image_run = [TOK["boi_token_id"]] + [TOK["image_token_id"]] * 256 + [TOK["eoi_token_id"]]
    ids = torch.tensor([[2, 31, 7, *image_run, 99, 5, *image_run, 13, 44, 250]])
    with torch.no_grad():
        want = ref(input_ids=ids, pixel_values=pixels).logits.float()
    got = ours.logits(ids, pixel_values=pixels)
    assert ours.multimodal.loaded_towers == ["vision"]
    assert torch.isfinite(want).all()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4
    # The images matter: swapping them changes the logits after the first image.
    swapped = ours.logits(ids, pixel_values=pixels.flip(0))
    assert not torch.allclose(swapped[0, 270:], got[0, 270:], atol=1e-3)
