"""The multimodal processor's own logic: media gathering, long-audio windows, processor config files.
(Image and audio preprocessing equal the reference in their own tests.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

from gemma3n.processor.processor import (has_media, media_source, read_preprocessor_config, split_long_audio,
                                         SAMPLE_RATE)


def test_has_media_finds_parts_anywhere():
    assert not has_media([{"role": "user", "content": "hi"}])
    assert not has_media([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    assert has_media([{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio", "path": "x"}]}])


def test_media_source_keys_and_error():
    assert media_source({"type": "image", "url": "u"}) == "u"
    assert media_source({"type": "audio", "audio": b"x", "path": "p"}) == b"x"
    with pytest.raises(ValueError, match="needs one of the keys image, url, path"):
        media_source({"type": "image"})


def test_long_audio_is_split_into_30_s_windows_with_a_warning():
    short = np.zeros(30 * SAMPLE_RATE, dtype=np.float32)
    assert len(split_long_audio(short)) == 1
    long = np.sin(np.arange(75 * SAMPLE_RATE, dtype=np.float32) * 0.05)
    long[27 * SAMPLE_RATE:int(27.5 * SAMPLE_RATE)] = 0  # a pause before the 30 s limit: the first cut goes there
    with pytest.warns(UserWarning, match="75.0 s long.*3 consecutive clips"):
        pieces = split_long_audio(long, "talk.wav")
    assert all(len(p) <= 30 * SAMPLE_RATE for p in pieces) and 27 <= len(pieces[0]) / SAMPLE_RATE <= 27.5
    np.testing.assert_array_equal(np.concatenate(pieces), long)  # nothing dropped, nothing repeated


def test_processor_config_flat_and_nested(tmp_path):
    assert read_preprocessor_config(None) == {}
    assert read_preprocessor_config(tmp_path) == {}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"do_rescale": True, "sampling_rate": 16000, "size": {"height": 768, "width": 768}}))
    flat = read_preprocessor_config(tmp_path)
    assert flat["image_processor"]["do_rescale"] and flat["feature_extractor"]["sampling_rate"] == 16000
    assert flat["image_processor"]["size"] == {"height": 768, "width": 768}  # a flat dict value is kept
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"do_rescale": True, "sampling_rate": 16000}))
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": {"height": 768}}}))
    nested = read_preprocessor_config(tmp_path)
    assert nested["image_processor"]["size"] == {"height": 768} and "size" not in nested["feature_extractor"]
    (tmp_path / "processor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="processor_config.json: not valid JSON"):
        read_preprocessor_config(tmp_path)


def test_a_tokenizer_without_the_media_tokens_is_refused():
    """A tokenizer that does not spell <image_soft_token> as config.image_token_id would silently lose the image."""
    from gemma3n.config import ModelConfig
    from gemma3n.processor.processor import Processor

    class NoMediaTokens:
        chat_template, bos_token, eos_token = None, "<bos>", "<eos>"

        def token_to_id(self, token):
            return None

    config = ModelConfig(family="gemma3n", model_type="gemma3n", text=None)
    processor = Processor(NoMediaTokens(), config)
    with pytest.raises(ValueError, match="maps <image_soft_token> to None, but config.json expects id 262145"):
        processor._check_media_tokens(images=True, clips=False)
    processor._check_media_tokens(images=False, clips=False)  # text only: nothing to check
