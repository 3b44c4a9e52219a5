"""Our Processor equals transformers' Gemma3nProcessor (PIL image backend) on chat messages holding images given as
files (PNG with alpha, EXIF-rotated JPEG), as in-memory PIL images (palette with transparency) and as arrays."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers import Gemma3nAudioFeatureExtractor, Gemma3nProcessor  # noqa: E402
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil  # noqa: E402

from gemma3n.config import ModelConfig  # noqa: E402
from gemma3n.processor import GEMMA3N_CHAT_TEMPLATE  # noqa: E402
from gemma3n.processor.image import ImageError  # noqa: E402
from gemma3n.processor.processor import Processor  # noqa: E402

from .test_image import RELEASED, make_image  # noqa: E402


@pytest.fixture(scope="module")
def processors(mm_tokenizers):
    reference_tokenizer, our_tokenizer = mm_tokenizers
    reference = Gemma3nProcessor(feature_extractor=Gemma3nAudioFeatureExtractor(),
                                 image_processor=SiglipImageProcessorPil(**RELEASED),
                                 tokenizer=reference_tokenizer, chat_template=GEMMA3N_CHAT_TEMPLATE)
    our_tokenizer = copy.copy(our_tokenizer)
    our_tokenizer.chat_template = GEMMA3N_CHAT_TEMPLATE
    # the 270M vocabulary gets the Gemma 3n media tokens appended, so the config names the ids they landed on
    ids = {k: our_tokenizer.token_to_id(t) for k, t in (("image_token_id", "<image_soft_token>"),
                                                        ("audio_token_id", "<audio_soft_token>"))}
    return reference, Processor(our_tokenizer, ModelConfig(family="gemma3n", model_type="gemma3n", text=None, **ids))


@pytest.fixture
def messages(tmp_path):
    make_image("RGBA", 90, 130, seed=4).save(tmp_path / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    make_image("RGB", 120, 200, seed=5).save(tmp_path / "rotated.jpg", exif=exif)
    return [
        {"role": "system", "content": "You compare pictures."},
        {"role": "user", "content": [
            {"type": "image", "path": str(tmp_path / "alpha.png")},
            {"type": "text", "text": "and"},
            {"type": "image", "image": make_image("P", 70, 50, seed=6)},
            {"type": "image", "url": str(tmp_path / "rotated.jpg")},
            {"type": "image", "image": Image.open(tmp_path / "rotated.jpg")},  # in memory: no EXIF transpose
            {"type": "text", "text": "Which differ?"},
        ]},
    ]


def test_processor_matches_gemma3n_processor(processors, messages):
    reference, ours = processors
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    got = ours(messages)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    assert got["pixel_values"].shape == (4, 3, 768, 768)
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)


def test_numpy_image_in_a_message_matches(processors):
    reference, ours = processors
    array = np.random.default_rng(0).integers(0, 256, (64, 48, 4), dtype=np.uint8)
    messages = [{"role": "user", "content": [{"type": "image", "image": array}, {"type": "text", "text": "?"}]}]
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    torch.testing.assert_close(ours(messages)["pixel_values"], want["pixel_values"], rtol=0, atol=0)


def test_unreadable_image_in_a_message_names_the_file(processors, tmp_path):
    _, ours = processors
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    messages = [{"role": "user", "content": [{"type": "image", "path": str(bad)}, {"type": "text", "text": "?"}]}]
    with pytest.raises(ImageError, match="holiday.jpg"):
        ours(messages)
