"""Audio input: decode a file, bytes, data: URL or array into the float32 16 kHz mono waveform the model hears.

Decoding: `soundfile` (libsndfile, bundled in its wheel: wav, flac, ogg/vorbis/opus, mp3, aiff, ...) first, since it is
exact and fast; anything it cannot read (m4a/aac, wma, webm, the audio track of a video, ...) goes through PyAV,
whose wheel bundles ffmpeg. Resampling: libsoxr (`soxr`, numpy only), the resampler librosa and others rely on,
at its "very high quality" setting (a linear-phase windowed-sinc polyphase filter). Channels are averaged to mono.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..media import MediaError, MediaPolicy, read_source
from .audio_features import SAMPLE_RATE, AudioFeatureExtractor

__all__ = ["AudioError", "AudioFeatureExtractor", "SAMPLE_RATE", "decode_audio", "is_silent", "load_audio",
           "resample", "to_mono"]


class AudioError(MediaError):
    """An audio input that cannot be used; the message names the source and says what to do."""


def load_audio(source: Any, sampling_rate: int | None = None, allow_network: bool = False) -> np.ndarray:
    """Any supported audio source -> float32 mono waveform at 16 kHz.

    source: a path (str / Path), bytes, a binary file object, a `data:audio/...;base64,` URL, an http(s) URL (only
    with allow_network), a numpy array or
    torch tensor of samples (at `sampling_rate`, default 16 kHz; 2-D arrays are (samples, channels) or
    (channels, samples), the shorter axis being the channels), a `(array, rate)` pair or a Hugging Face datasets
    dict `{"array": ..., "sampling_rate": ...}`. Integer samples are scaled to [-1, 1].
    """
    name = describe(source)
    if isinstance(source, dict) and "array" in source:
        source, sampling_rate = source["array"], source.get("sampling_rate", sampling_rate)
    elif isinstance(source, tuple) and len(source) == 2 and np.isscalar(source[1]):
        source, sampling_rate = source
    if _is_array(source):
        samples, rate = _array_samples(source, name), int(sampling_rate or SAMPLE_RATE)
    else:
        samples, rate = decode_audio(_open_source(source, name, allow_network), name)
    return _finish(samples, rate, name)


def describe(source: Any) -> str:
    """A short human name for an audio source, used in every error message."""
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        return text[:40] + "..." if text.startswith("data:") and len(text) > 40 else text
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes of audio>"
    if isinstance(source, dict) and "path" in source and source["path"]:
        return str(source["path"])
    return f"<audio {type(source).__name__}>"


def decode_audio(data: str | io.IOBase, name: str) -> tuple[np.ndarray, int]:
    """A file path or binary stream -> ((samples, channels) float32, native sample rate)."""
    import soundfile

    try:
        with soundfile.SoundFile(data) as file:
            declared, rate = file.frames, file.samplerate
            samples = file.read(dtype="float32", always_2d=True)
        _check_complete(len(samples), declared, rate, name)
        return samples, int(rate)
    except (RuntimeError, TypeError, ValueError) as sf_error:  # libsndfile's errors are RuntimeErrors
        if isinstance(sf_error, AudioError):
            raise
        first_error = sf_error
    if not isinstance(data, str):
        data.seek(0)
    try:
        decoded = decode_audio_track(data, name)
    except AudioError:
        raise
    except Exception as av_error:  # ffmpeg raises many error types; all mean "not decodable"
        raise AudioError(f"{name}: cannot decode this as audio ({_first_line(av_error) or _first_line(first_error)})."
                         " Give a wav, flac, ogg, mp3 or m4a file (or anything ffmpeg reads).") from None
    if decoded is None:
        raise AudioError(f"{name}: the file has no audio stream")
    return decoded


def decode_audio_track(data: str | io.IOBase, name: str) -> tuple[np.ndarray, int] | None:
    """The first audio stream of any container ffmpeg reads -> ((samples, channels) float32, rate); None if none."""
    import av

    with av.open(data) as container:
        if not container.streams.audio:
            return None
        stream = container.streams.audio[0]
        to_float = av.AudioResampler(format="fltp")  # planar float32; keeps the layout and rate
        chunks, rate = [], stream.rate
        for frame in container.decode(stream):
            for out in to_float.resample(frame):
                chunks.append(out.to_ndarray())
                rate = out.sample_rate
        chunks.extend(out.to_ndarray() for out in to_float.resample(None))
        declared = int(stream.duration * stream.time_base * rate) if stream.duration and rate else 0
    if not chunks:
        return np.zeros((0, 1), np.float32), int(rate or SAMPLE_RATE)
    samples = np.concatenate(chunks, axis=1).T.astype(np.float32, copy=False)
    _check_complete(len(samples), declared, rate, name)
    return samples, int(rate)


def _check_complete(decoded: int, declared: int, rate: int, name: str) -> None:
    """A file that decodes to clearly fewer samples than its header declares is truncated: say so, do not guess.

    The 20 % margin is for headerless VBR mp3, whose declared length is only an estimate from the first frame."""
    if declared > 0 and decoded < 0.8 * declared - 0.05 * rate:
        raise AudioError(f"{name}: the file is truncated or corrupt: its header declares {declared / rate:.2f} s "
                         f"but only {decoded / rate:.2f} s could be decoded")


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(samples, channels) -> (samples,) by averaging the channels."""
    return samples[:, 0] if samples.shape[1] == 1 else samples.mean(axis=1, dtype=np.float32)


def resample(waveform: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling with libsoxr (very high quality); identity when the rates are equal."""
    if from_rate == to_rate:
        return waveform.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(waveform.astype(np.float32, copy=False), from_rate, to_rate, quality="VHQ")


def is_silent(waveform: np.ndarray, threshold_db: float = -60.0) -> bool:
    """True when no sample rises above `threshold_db` dBFS (digital silence or near it)."""
    return waveform.size == 0 or float(np.max(np.abs(waveform))) < 10 ** (threshold_db / 20)


def _finish(samples: np.ndarray, rate: int, name: str) -> np.ndarray:
    if rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate}")
    if samples.shape[0] == 0:
        raise AudioError(f"{name}: contains no audio samples (empty recording)")
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{name}: contains NaN or infinite samples")
    return resample(to_mono(samples), rate)


def _is_array(source: Any) -> bool:
    return isinstance(source, np.ndarray) or type(source).__module__.startswith("torch")


def _array_samples(array: Any, name: str) -> np.ndarray:
    """A user array -> (samples, channels) float32 in [-1, 1]."""
    if not isinstance(array, np.ndarray):
        array = array.detach().cpu().float().numpy()
    if array.ndim == 1:
        array = array[:, None]
    elif array.ndim == 2:
        array = array.T if array.shape[0] < array.shape[1] else array  # the shorter axis holds the channels
    else:
        raise AudioError(f"{name}: expected a 1-D or 2-D array of samples, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.unsignedinteger):
        half = float(2 ** (8 * array.dtype.itemsize - 1))
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array / float(2 ** (8 * array.dtype.itemsize - 1))).astype(np.float32)
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioError(f"{name}: unsupported sample type {array.dtype}")
    return array.astype(np.float32, copy=False)


def _open_source(source: Any, name: str, allow_network: bool = False) -> str | io.IOBase:
    """Path -> checked path string; bytes / data: URL / file object -> an in-memory stream (media/source.py)."""
    if isinstance(source, dict) and source.get("bytes"):
        source = source["bytes"]
    elif isinstance(source, dict) and source.get("path"):
        source = source["path"]
    try:
        data = read_source(source, "audio", MediaPolicy(allow_network=allow_network))
    except MediaError as e:
        raise AudioError(str(e)) from None
    return str(data) if isinstance(data, Path) else io.BytesIO(data)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
