"""Gemma 3 prompts with images: our Processor equals transformers' Gemma3Processor (PIL image backend,
Gemma3ImageProcessorPil) on the real Gemma 3 vocabulary: input_ids, attention_mask, pixel_values and the expanded
prompt text, for several images and aspect ratios, with and without pan & scan and with other pan & scan settings."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers")

from transformers import Gemma3Processor  # noqa: E402
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil  # noqa: E402

from gemma3n.config import ModelConfig  # noqa: E402
from gemma3n.processor.gemma3_image import Gemma3ImageProcessor  # noqa: E402
from gemma3n.processor.processor import Processor  # noqa: E402

from ..reference.tiny_gemma3 import GEMMA3_CHAT_TEMPLATE, preprocessor_config  # noqa: E402

SIZE, TOKENS = 112, 16  # a small tower size and run length keep the test fast; the rules do not depend on them


@pytest.fixture(scope="module")
def tokenizers(mm_tokenizers):
    """The real Gemma 3 vocabulary (its 270M tokenizer) plus <image_soft_token>, which only the image models'
    vocabulary holds (the 270M one ends just before it)."""
    import copy
    reference, ours = mm_tokenizers
    ours = copy.copy(ours)
    ours.chat_template = GEMMA3_CHAT_TEMPLATE
    return reference, ours


def make_processors(tokenizers, **settings):
    reference_tokenizer, our_tokenizer = tokenizers
    config = {k: v for k, v in preprocessor_config(SIZE, **settings).items() if k != "image_processor_type"}
    reference = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(**{k: v for k, v in config.items()
                                                                             if v is not None}),
                                tokenizer=reference_tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                                image_seq_length=TOKENS)
    model_config = ModelConfig.from_dict({
        "model_type": "gemma3", "mm_tokens_per_image": TOKENS,
        "image_token_index": our_tokenizer.token_to_id("<image_soft_token>"),
        "text_config": {"vocab_size": 262_208, "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 8,
                        "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 8},
        "vision_config": {"image_size": SIZE, "patch_size": 14}})
    return reference, Processor(our_tokenizer, model_config, {"image_processor": config})


def image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.3, 1, h)[:, None, None]
    rgba = np.clip(ramp * 0.7 + rng.integers(0, 77, (h, w, 4)), 0, 255).astype(np.uint8)
    return Image.fromarray(rgba if mode == "RGBA" else rgba[..., :3], mode)


def conversation(images: list) -> list[dict]:
    parts = [{"type": "image", "image": im} for im in images]
    return [{"role": "system", "content": "Compare."},
            {"role": "user", "content": [parts[0], {"type": "text", "text": "and then"}, *parts[1:],
                                         {"type": "text", "text": "Which is wider?"}]}]


# wide (2 crops at the defaults), tall (3), square (none), nearly square (none), wide but too small for crops
IMAGES = [(300, 700, 1), (1100, 300, 2), (200, 200, 3), (400, 450, 4), (100, 400, 5)]


# Gemma3Processor's pan & scan settings come from the call (its own defaults otherwise); ours take the same names.
OURS = {"pan_and_scan_min_crop_size": "min_crop_size", "pan_and_scan_max_num_crops": "max_crops",
        "pan_and_scan_min_ratio_to_activate": "min_ratio"}


@pytest.mark.parametrize("settings", [
    {},
    {"do_pan_and_scan": True},
    {"do_pan_and_scan": True, "pan_and_scan_min_crop_size": 100, "pan_and_scan_max_num_crops": 3,
     "pan_and_scan_min_ratio_to_activate": 1.1},
], ids=["plain", "pan_and_scan", "pan_and_scan_other_settings"])
def test_processor_matches_gemma3_processor(tokenizers, settings):
    reference, ours = make_processors(tokenizers)
    images = [image(h, w, seed, "RGBA" if seed == 3 else "RGB") for h, w, seed in IMAGES]
    messages = conversation(images)
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt", **settings)
    ask = {OURS[k]: v for k, v in settings.items() if k in OURS} or bool(settings)
    got = ours(messages, pan_and_scan=ask)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["attention_mask"].tolist() == want["attention_mask"].tolist()
    assert got["pixel_values"].shape == want["pixel_values"].shape
    torch.testing.assert_close(got["pixel_values"], want["pixel_values"], rtol=0, atol=0)
    # the text that was tokenised is the reference's expansion of the rendered template
    rendered = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    processed = reference.image_processor(images, **{"do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256,
                                                     "pan_and_scan_max_num_crops": 4,
                                                     "pan_and_scan_min_ratio_to_activate": 1.2, **settings})
    replacements = [reference.replace_image_token(processed, i) for i in range(len(images))]
    expanded, _ = reference.get_text_with_replacements([rendered], replacements)
    assert ours.rendered_text == expanded[0]
    crops = sum(processed["num_crops"])
    assert got["pixel_values"].shape[0] == len(images) + crops
    assert (crops > 0) == bool(settings)


def test_bad_pan_and_scan_settings_are_named(tokenizers):
    _, ours = make_processors(tokenizers)
    messages = conversation([image(300, 700, 1)])
    with pytest.raises(ValueError, match="'crops' is unknown"):
        ours(messages, pan_and_scan={"crops": 2})
    with pytest.raises(ValueError, match="max_crops must be a positive number"):
        ours(messages, pan_and_scan={"max_crops": 0})


def test_text_only_prompt_is_left_as_written(tokenizers):
    _, ours = make_processors(tokenizers)
    got = ours([{"role": "user", "content": "What does <start_of_image> mean?"}])
    assert ours.rendered_text.count("<start_of_image>") == 1 and "pixel_values" not in got


def test_preprocessor_config_pan_and_scan_keys_are_ignored_as_by_gemma3_processor(tokenizers):
    reference, ours = make_processors(tokenizers, do_pan_and_scan=True)
    messages = conversation([image(300, 700, 1)])
    want = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")
    got = ours(messages)
    assert got["input_ids"].tolist() == want["input_ids"].tolist()
    assert got["pixel_values"].shape[0] == want["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("hw", [(300, 700), (700, 300), (896, 896), (250, 1500), (2000, 257), (256, 520)])
def test_pan_and_scan_crops_equal_the_reference(hw):
    h, w = hw
    rgb = np.asarray(image(h, w, 7))
    ours = Gemma3ImageProcessor.from_config(None).with_pan_and_scan(True).pan_and_scan(rgb)
    want = Gemma3ImageProcessorPil().pan_and_scan(np.moveaxis(rgb, -1, 0), 256, 4, 1.2)
    assert len(ours) == len(want)
    for a, b in zip(ours, want):
        assert np.array_equal(np.moveaxis(a, -1, 0), b)


def test_released_defaults_equal_the_reference_image_processor():
    ours = Gemma3ImageProcessor.from_config(preprocessor_config(896))
    pixels, crops = ours([image(300, 500, 9)])
    config = {k: v for k, v in preprocessor_config(896).items() if v is not None and k != "image_processor_type"}
    want = Gemma3ImageProcessorPil(**config)([image(300, 500, 9)], return_tensors="pt")["pixel_values"]
    assert crops == [0] and pixels.shape == (1, 3, 896, 896)
    torch.testing.assert_close(pixels, want, rtol=0, atol=0)
