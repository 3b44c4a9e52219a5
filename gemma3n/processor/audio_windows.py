"""Split a long recording into windows the model can hear at once (at most 30 s: 188 audio tokens).

Windows do not overlap (an overlap would repeat words in the joined text); instead each cut is placed at the
quietest moment of the last few seconds before the limit, so that a cut falls in a pause between words whenever
the speaker makes one. Deterministic: the same samples always give the same windows.
"""
from __future__ import annotations

import numpy as np

from gemma3n.processor.audio_features import SAMPLE_RATE


def split_windows(waveform: np.ndarray, sampling_rate: int = SAMPLE_RATE, max_seconds: float = 30.0,
                  search_seconds: float = 6.0, frame_seconds: float = 0.02,
                  smooth_seconds: float = 0.1) -> list[tuple[int, int]]:
    """(start, end) sample ranges, contiguous, covering the whole waveform, each at most `max_seconds` long.

    A cut goes at the quietest `frame_seconds` frame (energy averaged over `smooth_seconds`, so one quiet frame
    inside a word does not win over a real pause) within the last `search_seconds` of the window; ties go to the
    latest frame, which keeps windows long.
    """
    if not 0 < search_seconds < max_seconds:
        raise ValueError(f"search_seconds must be in (0, max_seconds={max_seconds}), got {search_seconds}")
    n, limit = len(waveform), int(max_seconds * sampling_rate)
    frame = max(1, int(frame_seconds * sampling_rate))
    loudness = _smoothed_frame_energy(waveform, frame, max(1, round(smooth_seconds / frame_seconds)))
    windows, start = [], 0
    while n - start > limit:
        first = (start + limit - int(search_seconds * sampling_rate)) // frame + 1  # frames wholly inside
        last = (start + limit) // frame  # frames that end at or before the limit
        candidates = loudness[first:last]
        quietest = first + len(candidates) - 1 - int(np.argmin(candidates[::-1]))
        cut = quietest * frame + frame // 2  # the middle of the quietest frame
        windows.append((start, cut))
        start = cut
    windows.append((start, n))
    return windows


def _smoothed_frame_energy(waveform: np.ndarray, frame: int, smooth: int) -> np.ndarray:
    """Mean square of each whole frame, then a centred moving average over `smooth` frames."""
    count = len(waveform) // frame
    energy = np.square(waveform[: count * frame].astype(np.float64)).reshape(count, frame).mean(axis=1)
    if smooth <= 1:
        return energy
    padded = np.pad(energy, (smooth // 2, smooth - 1 - smooth // 2), mode="edge")
    return np.convolve(padded, np.ones(smooth) / smooth, mode="valid")
