"""`gemma3n transcribe`: windows, instructions and the errors people see (the model part needs the multimodal
seam: see tests/reference/test_audio_end_to_end.py)."""
import numpy as np

from gemma3n.cli import transcription_instruction, transcription_windows

from .processor.audio_samples import encode
from .console import gemma3n as gemma3n_cli


def test_windows_skip_silence_and_stay_within_the_limit():
    rng = np.random.default_rng(0)
    wave = (0.2 * rng.standard_normal(75 * 16_000)).astype(np.float32)
    wave[20 * 16_000: 45 * 16_000] = 0.0  # 25 s of silence in the middle
    windows = transcription_windows(wave, 30.0)
    assert all(0 < b - a <= 30 * 16_000 for a, b in windows)
    assert windows[0][0] == 0 and windows[-1][1] == len(wave)
    assert all(np.abs(wave[a:b]).max() > 0.01 for a, b in windows)
    assert sum(b - a for a, b in windows) >= 50 * 16_000  # all the speech is kept


def test_instructions():
    assert "Transcribe" in transcription_instruction(None)
    assert "into French" in transcription_instruction("French")


def test_bad_files_fail_before_loading_a_model(tmp_path):
    missing = gemma3n_cli("transcribe", str(tmp_path / "none.wav"), "--model", str(tmp_path / "no-model"))
    assert missing.returncode == 2 and "audio file not found" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "silence.wav").write_bytes(encode(np.zeros(16_000, np.float32), 16_000, "wav"))
    silent = gemma3n_cli("transcribe", str(tmp_path / "silence.wav"), "--model", str(tmp_path / "no-model"))
    assert silent.returncode == 0 and "silent" in silent.stderr and silent.stdout == ""
    (tmp_path / "tone.flac").write_bytes(encode(np.full(16_000, 0.1, np.float32), 16_000, "flac"))
    window = gemma3n_cli("transcribe", str(tmp_path / "tone.flac"), "--window-seconds", "45")
    assert window.returncode == 2 and "argument --window-seconds: must be in [1.0, 30.0], got 45" in window.stderr
