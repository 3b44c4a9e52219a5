"""split_windows: long recordings cut into <= 30 s windows, in pauses, covering every sample."""
from __future__ import annotations

import numpy as np
import pytest

from gemma3n.processor.audio_windows import split_windows

RATE = 16_000


def _words(seconds: float, pauses: list[tuple[float, float]], seed: int = 0) -> np.ndarray:
    """Noise 'words' of 0.3 s separated by 0.08 s gaps (too short to cut in), plus longer pauses given in s."""
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.standard_normal(int(seconds * RATE)).astype(np.float32)
    t = np.arange(len(x)) / RATE
    x[(t % 0.38) > 0.30] *= 0.05  # short inter-word dips, still voiced-ish
    for a, b in pauses:
        x[int(a * RATE): int(b * RATE)] = 0.001 * rng.standard_normal(int(b * RATE) - int(a * RATE))
    return x


def _check_cover(windows, n, max_seconds=30.0):
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(windows, windows[1:]))
    assert all(0 < end - start <= max_seconds * RATE for start, end in windows)


def test_short_recording_is_one_window():
    assert split_windows(np.zeros(10 * RATE, np.float32)) == [(0, 10 * RATE)]
    assert split_windows(np.zeros(30 * RATE, np.float32)) == [(0, 30 * RATE)]


def test_cuts_fall_in_the_pauses():
    pauses = [(26.0, 26.4), (51.2, 51.5), (78.9, 79.3)]
    x = _words(95.0, pauses)
    windows = split_windows(x)
    _check_cover(windows, len(x))
    cuts = [end / RATE for _, end in windows[:-1]]
    assert len(cuts) == 3
    for cut, (a, b) in zip(cuts, pauses):
        assert a < cut < b, (cut, a, b)


def test_no_pause_still_cuts_within_the_limit_and_is_deterministic():
    x = _words(70.0, [])
    windows = split_windows(x)
    _check_cover(windows, len(x))
    assert len(windows) == 3 and windows == split_windows(x.copy())


def test_other_limits_and_bad_arguments():
    x = _words(25.0, [(9.0, 9.3)])
    windows = split_windows(x, max_seconds=10.0, search_seconds=2.0)
    _check_cover(windows, len(x), max_seconds=10.0)
    assert 9.0 < windows[0][1] / RATE < 9.3
    with pytest.raises(ValueError, match="search_seconds"):
        split_windows(x, max_seconds=10.0, search_seconds=10.0)
