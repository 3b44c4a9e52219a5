"""Log-mel features for the Gemma 3n audio encoder (the USM front end), identical to the reference extractor.

Per clip (16 kHz mono float waveform): frames of 513 samples every 160 (10 ms); HTK preemphasis turns each into
512 samples; periodic Hann window; zero-padded FFT of 1024; magnitude spectrum; 128 HTK-mel triangular filters
(125-7600 Hz, unnormalised); natural log floored at 1e-5. A batch is right-padded with zeros to the longest clip,
rounded up to a multiple of 128 samples, after truncating every clip at 30 s. A frame is valid when its first
sample is a real (not padded) sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

SAMPLE_RATE = 16_000


def mel_filter_bank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int,
                    fft_length: int) -> np.ndarray:
    """Triangular HTK-mel filters without area normalisation, as a (n_freqs, n_mels) float64 matrix."""
    # Bin centre frequencies in float32 (then promoted): the reference does the same, which matters for rates
    # whose bin spacing is not exactly representable.
    bin_hz = np.arange(n_freqs, dtype=np.float32) * np.float32(sample_rate / fft_length)
    mel_lo, mel_hi = (2595.0 * math.log10(1.0 + f / 700.0) for f in (f_min, f_max))
    edges_hz = 700.0 * (10 ** (np.linspace(mel_lo, mel_hi, n_mels + 2) / 2595.0) - 1.0)  # (n_mels + 2,)
    widths = np.diff(edges_hz)
    offsets = edges_hz[None, :] - bin_hz[:, None].astype(np.float64)  # (n_freqs, n_mels + 2)
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


@dataclass(frozen=True)
class AudioFeatureExtractor:
    """Waveforms -> (input_features (N, T, mel) float32, input_features_mask (N, T) bool, True = valid)."""

    feature_size: int = 128
    sampling_rate: int = SAMPLE_RATE
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None
    padding_value: float = 0.0
    max_length: int = 480_000  # samples: 30 s; longer clips are cut (the reference does the same)
    pad_to_multiple_of: int = 128

    @classmethod
    def from_config(cls, preprocessor_config: Mapping[str, Any] | None) -> "AudioFeatureExtractor":
        """From a preprocessor_config.json dict (None = the released checkpoints' defaults)."""
        cfg = dict(preprocessor_config or {})
        if float(cfg.get("dither", 0.0) or 0.0) != 0.0:
            # Random dither cannot reproduce any reference output; the released checkpoints use 0.
            raise ValueError(f"preprocessor_config: dither={cfg['dither']} is not supported (only 0.0)")
        if cfg.get("padding_side", "right") != "right":
            raise ValueError(f"preprocessor_config: padding_side={cfg['padding_side']!r} is not supported "
                             "(only 'right')")
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in cfg.items() if k in known and v is not None}
        for key in ("per_bin_mean", "per_bin_stddev"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n

    @property
    def max_seconds(self) -> float:
        return self.max_length / self.sampling_rate

    def __call__(self, waveforms: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad the batch, then compute the log-mel frames and the frame validity mask of each clip."""
        if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
            waveforms = [waveforms]
        clips = [self._as_clip(w, i) for i, w in enumerate(waveforms)]
        if not clips:
            raise ValueError("no audio clips given")
        padded, sample_mask = self._pad(clips)
        n_frames = (padded.shape[1] - (self.frame_length + 1)) // self.hop_length + 1
        if n_frames <= 0:
            raise ValueError(f"audio too short: {padded.shape[1]} samples after padding; at least "
                             f"{self.frame_length + 1} ({(self.frame_length + 1) / self.sampling_rate * 1000:.0f} "
                             "ms) are needed for one feature frame")
        features = self.log_mel(padded)
        frame_mask = sample_mask[:, :: self.hop_length][:, :n_frames]
        return torch.from_numpy(features), torch.from_numpy(frame_mask)

    def _as_clip(self, waveform, index: int) -> np.ndarray:
        clip = np.asarray(waveform)
        if clip.ndim != 1:
            raise ValueError(f"audio clip {index}: expected a 1-D mono waveform, got shape {clip.shape}")
        if not np.issubdtype(clip.dtype, np.floating):
            raise ValueError(f"audio clip {index}: expected float samples in [-1, 1], got dtype {clip.dtype} "
                             "(use gemma3n.processor.audio.load_audio to convert)")
        return clip[: self._rounded(self.max_length)].astype(np.float32, copy=False)

    def _rounded(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m or n % m == 0 else (n // m + 1) * m

    def _pad(self, clips: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Right-pad to the longest clip rounded up to pad_to_multiple_of; sample mask True = real sample."""
        length = self._rounded(max(len(c) for c in clips))
        padded = np.full((len(clips), length), self.padding_value, dtype=np.float32)
        mask = np.zeros((len(clips), length), dtype=bool)
        for row, clip in enumerate(clips):
            padded[row, : len(clip)] = clip
            mask[row, : len(clip)] = True
        return padded, mask

    def log_mel(self, padded: np.ndarray) -> np.ndarray:
        """(N, samples) float32 -> (N, frames, feature_size) float32 log-mel spectrogram."""
        if self.input_scale_factor != 1.0:
            padded = padded * self.input_scale_factor
        size = self.frame_length + 1  # one extra sample: the preemphasis context of the frame's first sample
        n_frames = (padded.shape[1] - size) // self.hop_length + 1
        frames = np.lib.stride_tricks.as_strided(
            padded, shape=(padded.shape[0], n_frames, size),
            strides=(padded.strides[0], padded.strides[1] * self.hop_length, padded.strides[1]))
        frames = self._preemphasize(frames) * self._window()
        magnitude = np.abs(np.fft.rfft(frames, n=self.fft_length, axis=-1))  # (N, frames, fft/2 + 1)
        mel = magnitude @ self._filters()  # float64, as in the reference
        log_mel = np.log(np.maximum(mel, self.mel_floor))
        if self.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(self.per_bin_mean)
        if self.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(self.per_bin_stddev)
        return log_mel.astype(np.float32)

    def _preemphasize(self, frames: np.ndarray) -> np.ndarray:
        """(.., frame_length + 1) -> (.., frame_length) with y[j] = x[j] - a * x[j-1]."""
        a = self.preemphasis
        if a <= 0.0:
            return frames[..., :-1]
        if not self.preemphasis_htk_flavor:
            return frames[..., 1:] - a * frames[..., :-1]
        # HTK: the frame's first sample has no predecessor inside the frame, so it is scaled by (1 - a).
        return np.concatenate([frames[..., :1] * (1.0 - a), frames[..., 1:-1] - a * frames[..., :-2]], axis=-1)

    def _window(self) -> np.ndarray:
        n = np.arange(self.frame_length, dtype=np.float32)
        return (0.5 * (1 - np.cos(2 * np.pi * n / self.frame_length))).astype(np.float32)  # periodic Hann

    def _filters(self) -> np.ndarray:
        return mel_filter_bank(self.fft_length // 2 + 1, self.min_frequency, self.max_frequency, self.feature_size,
                               self.sampling_rate, self.fft_length)
