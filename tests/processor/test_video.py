"""load_video: deterministic frame sampling, resizing, the sound track, and clear errors (videos made by PyAV)."""
from __future__ import annotations

import numpy as np
import pytest

from gemma3n.processor.video import VideoError, load_video, sample_times, video_content, video_parts

from .audio_samples import encode, make_video


def _index(image) -> int:
    """The frame index painted into a test frame as 8 binary stripes, read back through the lossy codec."""
    stripes = np.asarray(image.convert("L"), dtype=float).mean(axis=0).reshape(8, -1).mean(axis=1)
    return int(sum(1 << bit for bit in range(8) if stripes[bit] > 128))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")


def test_sample_times_rule():
    assert sample_times(3.0) == [0.5, 1.5, 2.5]
    assert sample_times(3.0, fps=2) == [0.25, 0.75, 1.25, 1.75, 2.25, 2.75]
    assert sample_times(100.0, max_frames=4) == [12.5, 37.5, 62.5, 87.5]
    assert sample_times(0.2) == [0.1]
    with pytest.raises(VideoError, match="fps"):
        sample_times(3.0, fps=0)


def test_frames_are_the_ones_on_screen_at_the_sample_times(clip):
    video = load_video(clip, size=None)
    assert video.timestamps == [0.5, 1.5, 2.5] and abs(video.duration - 3.0) < 0.15
    assert [_index(f) for f in video.frames] == [5, 15, 25]
    assert video.frames[0].size == (64, 48) and video.frames[0].mode == "RGB"
    capped = load_video(clip, max_frames=2, size=64)
    assert [_index(f) for f in capped.frames] == [7, 22]  # t = 0.75, 2.25
    assert capped.frames[0].size == (64, 64)


def test_sampling_is_deterministic_and_bytes_work(clip):
    a, b = load_video(clip, fps=4, size=16), load_video(clip.read_bytes(), fps=4, size=16)
    assert a.timestamps == b.timestamps
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.frames, b.frames))


def test_sound_track_is_16k_mono(clip):
    audio = load_video(clip).audio
    assert audio.dtype == np.float32 and abs(len(audio) / 16_000 - 3.0) < 0.2
    spectrum = np.abs(np.fft.rfft(audio[4000:20000]))
    assert abs(np.argmax(spectrum) * 16_000 / 16_000 - 440) < 3  # 1 Hz bins over 16000 samples


def test_video_without_sound_has_no_audio(tmp_path):
    video = load_video(make_video(tmp_path / "mute.mp4", seconds=2.0, tone_hz=None))
    assert video.audio is None and len(video.frames) == 2
    items = video_content(video)
    assert [i["type"] for i in items] == ["text", "image", "text", "image"]


def test_content_items_with_sound(clip):
    items = video_content(load_video(clip, size=8))
    assert [i["type"] for i in items][-2:] == ["text", "audio"] and items[0]["text"] == "Frame at 0.5 s:"


def test_clear_errors(tmp_path):
    with pytest.raises(VideoError, match="video file not found"):
        load_video(tmp_path / "none.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video" * 100)
    with pytest.raises(VideoError, match="cannot decode"):
        load_video(tmp_path / "junk.mp4")
    tone = (0.2 * np.sin(np.arange(16_000) / 5)).astype(np.float32)
    (tmp_path / "sound.ogg").write_bytes(encode(tone, 16_000, "ogg"))
    with pytest.raises(VideoError, match="no video stream"):
        load_video(tmp_path / "sound.ogg")


def test_video_parts_for_the_processor(clip):
    parts = video_parts(str(clip), {"image_processor": {"size": {"height": 32, "width": 32}}})
    assert [p["type"] for p in parts] == ["text", "image"] * 3 + ["text", "audio"]
    assert parts[1]["image"].size == (32, 32) and parts[-1]["audio"].dtype == np.float32
    custom = video_parts({"path": str(clip), "fps": 2, "max_frames": 4, "size": 16})
    assert [p["text"] for p in custom if p["type"] == "text"][:4] == [
        "Frame at 0.4 s:", "Frame at 1.1 s:", "Frame at 1.9 s:", "Frame at 2.6 s:"]
    assert custom[1]["image"].size == (16, 16)
    with pytest.raises(VideoError, match="network is off"):
        video_parts("https://example.com/v.mp4")
