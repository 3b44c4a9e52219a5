"""Speech for the decoding tests: espeak-ng when installed (scripts/test.sh installs it), else a synthetic
voiced signal (harmonics of a gliding pitch through moving formants, with pauses), so the tests never need a
download. Also small encoders for the container formats soundfile cannot write (m4a) and a tiny video."""
from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SENTENCE = "Ask not what your country can do for you, ask what you can do for your country."


def speech(rate_hint: int = 22_050) -> tuple[np.ndarray, int, str]:
    """(float32 mono waveform, its rate, where it came from)."""
    if shutil.which("espeak-ng"):
        import soundfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "speech.wav"
            subprocess.run(["espeak-ng", "-w", str(path), SENTENCE], check=True, capture_output=True)
            samples, rate = soundfile.read(path, dtype="float32")
        return samples, rate, "espeak-ng"
    return synthetic_speech(rate_hint), rate_hint, "synthetic"


def synthetic_speech(rate: int, seconds: float = 3.0) -> np.ndarray:
    """Voiced 'syllables': a 110-180 Hz harmonic series shaped by two moving formants, 250 ms each, with gaps."""
    t = np.arange(int(seconds * rate)) / rate
    f0 = 110 + 70 * (0.5 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    f1 = 500 + 300 * np.sin(2 * np.pi * 1.3 * t)
    f2 = 1500 + 700 * np.sin(2 * np.pi * 0.9 * t + 1)
    x = np.zeros_like(t)
    for k in range(1, 40):
        hz = k * f0
        gain = np.exp(-((hz - f1) / 200) ** 2) + 0.5 * np.exp(-((hz - f2) / 300) ** 2) + 0.02
        x += np.where(hz < rate / 2 - 200, gain * np.sin(k * phase), 0.0)
    envelope = (np.sin(2 * np.pi * 2 * t) > -0.3).astype(float)  # 250 ms pauses between syllables
    return (0.2 * x * envelope / np.abs(x).max()).astype(np.float32)


def encode(samples: np.ndarray, rate: int, fmt: str) -> bytes:
    """Encode mono float samples as wav / flac / ogg / mp3 (soundfile) or m4a (PyAV's AAC encoder)."""
    if fmt == "m4a":
        return encode_m4a(samples, rate)
    import soundfile

    subtype = {"wav": "PCM_16", "flac": "PCM_16", "ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}[fmt]
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt.upper(), subtype=subtype)
    return buffer.getvalue()


def encode_m4a(samples: np.ndarray, rate: int) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples[None, :].astype(np.float32), format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def make_video(path: Path, seconds: float = 3.0, fps: int = 10, size: tuple[int, int] = (64, 48),
               tone_hz: float | None = 440.0, codec: str = "mpeg4") -> Path:
    """A small video whose frame k shows k in binary as 8 stripes (so a frame tells its index), plus a sine
    tone as its sound track (none if tone_hz is None)."""
    import av
    from fractions import Fraction

    with av.open(str(path), "w") as container:
        video = container.add_stream(codec, rate=fps)
        video.width, video.height, video.pix_fmt = size[0], size[1], "yuv420p"
        audio = container.add_stream("aac", rate=16_000, layout="mono") if tone_hz else None
        for k in range(int(seconds * fps)):
            rgb = np.zeros((size[1], size[0], 3), np.uint8)
            for bit in range(8):  # the frame index in binary: 8 black / white stripes, robust to the codec
                rgb[:, bit * size[0] // 8: (bit + 1) * size[0] // 8] = 255 * ((k >> bit) & 1)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = k, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        if audio is not None:
            t = np.arange(int(seconds * 16_000)) / 16_000
            tone = (0.4 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate = 16_000
            container.mux(audio.encode(frame))
            container.mux(audio.encode(None))
    return path
