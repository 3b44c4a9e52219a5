"""A multimodal JSONL (images and audio, ms-swift's <image> / <audio> tags) trains on a tiny Gemma 3n checkpoint:
the media go through the inference processor and the frozen towers, the loss is on the assistant turn only."""
from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

import gemma3n
from gemma3n.finetune import finetune
from gemma3n.finetune import data as data_mod

from .tiny_data import words, write_jsonl


@pytest.fixture
def media(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "picture.png")
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(8000) / 16000)
    soundfile.write(tmp_path / "tone.wav", tone.astype(np.float32), 16000)
    return tmp_path


@pytest.mark.slow  # the tiny checkpoint's vision tower is the full-size MobileNetV5: ~1 min on 2 busy cores
def test_image_and_audio_conversations_train(tiny_base, media):
    _, base = tiny_base("multimodal")
    data = write_jsonl(media / "mm.jsonl", [
        {"messages": [{"role": "user", "content": f"<image> {words(30)}"},
                      {"role": "assistant", "content": words(40, 41)}], "images": ["picture.png"]},
        {"messages": [{"role": "user", "content": f"<audio> {words(31)} <image>"},
                      {"role": "assistant", "content": words(42)}], "audios": ["tone.wav"], "images": ["picture.png"]},
    ])
    model = gemma3n.load(base, dtype="float32")
    items = data_mod.Encoder(model, 2048).encode_all(data_mod.read_jsonl(data), "mm.jsonl")
    cfg = model.config
    assert (torch.tensor(items[0].input_ids) == cfg.image_token_id).sum() == cfg.vision_soft_tokens_per_image
    assert (torch.tensor(items[1].input_ids) == cfg.audio_token_id).sum() == cfg.audio_soft_tokens_per_image
    assert set(items[1].media) == {"pixel_values", "input_features", "input_features_mask"}
    # media tokens never carry loss: only the assistant's words and <end_of_turn>
    assert [label for label in items[1].labels if label != data_mod.IGNORE] == [42, 106]
    result = finetune(base, data, media / "out", max_steps=2, batch_size=2, lora_dropout=0.0,
                              learning_rate=1e-2, warmup_ratio=0.0, progress=False)
    assert result.steps == 2 and all(math.isfinite(r["loss"]) for r in result.history)
    assert result.history[1]["loss"] < result.history[0]["loss"]  # the same two examples, after one update
