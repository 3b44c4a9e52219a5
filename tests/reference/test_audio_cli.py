"""`gemma3n run --audio` and `gemma3n transcribe` on a tiny multimodal checkpoint with a tokenizer, in a
subprocess: the printed text equals the reference model's greedy continuation of the same prompt ids, fed the
reference feature extractor's features (for transcribe: window by window, joined)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import gemma3n
from gemma3n.cli import transcription_instruction, transcription_windows
from gemma3n.processor.audio import load_audio

from ..processor.audio_samples import encode
from ..console import gemma3n as gemma3n_cli
from .tiny import build_reference, save_reference, write_tiny_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    ref = build_reference("multimodal", seed=33, scale=0.1)
    folder = save_reference(ref, tmp_path_factory.mktemp("mm-cli"))
    write_tiny_tokenizer(folder)
    return ref, folder


def _reference_text(ref, model, waveforms: list[np.ndarray], instruction: str) -> str:
    """The reference's greedy continuation of our prompt ids for one user turn [audio, instruction]."""
    content = [{"type": "audio", "audio": w} for w in waveforms] + [{"type": "text", "text": instruction}]
    ids = model.processor([{"role": "user", "content": content}])["input_ids"]
    features = transformers.Gemma3nAudioFeatureExtractor()(waveforms, return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(input_ids=ids, input_features=features["input_features"],
                           input_features_mask=features["input_features_mask"], max_new_tokens=NEW_TOKENS,
                           do_sample=False, eos_token_id=[1, 106], pad_token_id=0)
    return model.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def _words(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    t = np.arange(int(seconds * 16_000)) / 16_000
    x = 0.3 * np.sin(2 * np.pi * 220 * t) * (np.sin(2 * np.pi * 1.5 * t) > -0.5) + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def test_run_with_audio_prints_the_reference_continuation(checkpoint, tmp_path):
    ref, folder = checkpoint
    wave = _words(2.5)
    (tmp_path / "clip.flac").write_bytes(encode(wave, 16_000, "flac"))
    done = gemma3n_cli("run", "--model", str(folder), "--audio", str(tmp_path / "clip.flac"), "-n", str(NEW_TOKENS),
                       "--temperature", "0", "Say it.")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    model = gemma3n.load(folder)
    decoded = load_audio(tmp_path / "clip.flac")
    assert done.stdout.strip() == _reference_text(ref, model, [decoded], "Say it.").strip()


@pytest.mark.slow
def test_transcribe_long_recording_window_by_window(checkpoint, tmp_path):
    ref, folder = checkpoint
    wave = _words(40.0)
    (tmp_path / "long.wav").write_bytes(encode(wave, 16_000, "wav"))
    done = gemma3n_cli("transcribe", "--model", str(folder), str(tmp_path / "long.wav"), "-n", str(NEW_TOKENS),
                       "--translate-to", "French")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    model = gemma3n.load(folder)
    decoded = load_audio(tmp_path / "long.wav")
    windows = transcription_windows(decoded, 30.0)
    assert len(windows) == 2 and done.stderr.count(" s]") == 2
    expected = [_reference_text(ref, model, [decoded[a:b]], transcription_instruction("French")).strip()
                for a, b in windows]
    assert done.stdout.strip() == " ".join(expected)
