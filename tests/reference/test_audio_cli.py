"""`gemma3n run --audio` and `gemma3n transcribe` on a tiny multimodal checkpoint with a tokenizer, in a
subprocess: the printed text equals the reference model's greedy continuation of the same prompt ids, fed the
reference feature extractor's features (for transcribe: window by window, joined)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gemma3n
from gemma3n.cli import transcription_instruction, transcription_windows
from gemma3n.processor.audio import load_audio
from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE

from ..processor.audio_samples import encode
from ..test_cli import gemma3n_cli
from .tiny import TINY_MEDIA_TOKENS, build_reference, save_reference

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

NEW_TOKENS = 6
SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
           TINY_MEDIA_TOKENS["boi_token_id"]: "<start_of_image>", TINY_MEDIA_TOKENS["boa_token_id"]: "<start_of_audio>",
           TINY_MEDIA_TOKENS["eoi_token_id"]: "<end_of_image>", TINY_MEDIA_TOKENS["image_token_id"]: "<image_soft_token>",
           TINY_MEDIA_TOKENS["eoa_token_id"]: "<end_of_audio>", TINY_MEDIA_TOKENS["audio_token_id"]: "<audio_soft_token>"}


def write_tiny_tokenizer(folder) -> None:
    """A 512-entry word-level vocabulary whose control and media tokens sit at the tiny model's ids."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(512)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(SPECIAL[i], special=True) for i in sorted(SPECIAL)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA3N_CHAT_TEMPLATE}))


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
