"""Video input: still frames (each one image for the vision tower) plus the sound track (one audio clip).

Gemma 3n has no video path of its own (neither has the reference); a video is given to it the way its model card
suggests: frames sampled at a fixed rate, and the audio. Sampling rule (deterministic, documented for the CLI):
the frame shown at t = (k + 1/2) / fps for k = 0, 1, ... while t < duration (1 fps by default: the middle of every
second). When that gives more than `max_frames` frames, `max_frames` instants are spread evenly instead:
t = (k + 1/2) * duration / max_frames. Each frame costs 256 tokens, so the cap bounds the prompt (16 frames =
4096 tokens). Frames are resized to size x size (aspect not kept, as the image processor does).
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..media import MediaError, MediaPolicy, read_source
from .audio import AudioError, decode_audio_track, resample, to_mono

DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 16
DEFAULT_SIZE = 768  # the released image processor's size


class VideoError(MediaError):
    """A video input that cannot be used; the message names the source and says what to do."""


@dataclass(frozen=True)
class Video:
    """Sampled frames (PIL RGB images) with their times in seconds, and the 16 kHz mono sound track if any."""

    frames: list
    timestamps: list[float]
    audio: np.ndarray | None
    duration: float


def sample_times(duration: float, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES) -> list[float]:
    """The instants (seconds) whose frames are kept; see the module docstring for the rule."""
    if fps <= 0 or max_frames < 1:
        raise VideoError(f"fps must be > 0 and max_frames >= 1 (got fps={fps}, max_frames={max_frames})")
    if duration * fps <= 0.5:  # shorter than half a sampling period: its middle frame
        return [duration / 2]
    count = math.ceil(duration * fps - 0.5)  # k with (k + 1/2) / fps < duration
    if count > max_frames:
        return [(k + 0.5) * duration / max_frames for k in range(max_frames)]
    return [(k + 0.5) / fps for k in range(count)]


def load_video(source: Any, fps: float = DEFAULT_FPS, max_frames: int = DEFAULT_MAX_FRAMES,
               size: int | None = DEFAULT_SIZE, with_audio: bool = True, allow_network: bool = False) -> Video:
    """A video file (path, bytes, binary file object, data: URL, or http(s) URL with allow_network) -> sampled
    frames and its sound track (None if silent).

    A video without a sound track is fine (audio is None); a file without any video stream is an error."""
    name = str(source) if isinstance(source, (str, os.PathLike)) else f"<video {type(source).__name__}>"
    data = _open(source, name, allow_network)
    frames, timestamps, duration = _decode_frames(data, name, fps, max_frames, size)
    audio = _sound_track(data, name) if with_audio else None
    return Video(frames=frames, timestamps=timestamps, audio=audio, duration=duration)


def video_content(video: Video, with_audio: bool = True) -> list[dict]:
    """Chat-message content items for a video: each frame as an image after its time, then the sound track."""
    items: list[dict] = []
    for t, frame in zip(video.timestamps, video.frames):
        items += [{"type": "text", "text": f"Frame at {t:.1f} s:"}, {"type": "image", "image": frame}]
    if with_audio and video.audio is not None:
        items += [{"type": "text", "text": "Sound track:"}, {"type": "audio", "audio": video.audio}]
    return items


def video_parts(source: Any, preprocessor: dict | None = None, allow_network: bool = False) -> list[dict]:
    """A chat "video" part's payload -> content parts: per frame its time (text) and the frame (image), then the
    sound track (audio) if there is one. The payload is a path / bytes, or a dict {"path" | "bytes": ...,
    "fps": ..., "max_frames": ..., "size": ...} to change the sampling; frames default to the image processor's
    size (768)."""
    options = dict(source) if isinstance(source, dict) else {"path": source}
    media = options.get("path", options.get("bytes"))
    video = load_video(media, fps=float(options.get("fps") or DEFAULT_FPS),
                       max_frames=int(options.get("max_frames") or DEFAULT_MAX_FRAMES),
                       size=options.get("size") or _image_size(preprocessor), allow_network=allow_network)
    return video_content(video)


def _image_size(preprocessor: dict | None) -> int:
    """The square size the image processor resizes to (preprocessor_config's "size"), default 768."""
    size = ((preprocessor or {}).get("image_processor") or {}).get("size") or {}
    if isinstance(size, dict):
        return int(size.get("height") or size.get("shortest_edge") or DEFAULT_SIZE)
    return int(size)


def _decode_frames(data, name: str, fps: float, max_frames: int, size: int | None):
    import av

    try:
        with av.open(_rewind(data)) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: has no video stream (for a sound file use --audio)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            duration = _duration(container, stream)
            if duration is None:  # no duration in the headers: count the frames once
                duration = max((f.time or 0.0) for f in container.decode(stream)) + _frame_step(stream)
                container.seek(0)
            targets = sample_times(duration, fps, max_frames)
            picked = _frames_at(container.decode(stream), targets)
    except VideoError:
        raise
    except Exception as e:  # ffmpeg reports corrupt input with many error types
        raise VideoError(f"{name}: cannot decode this video ({str(e).strip() or type(e).__name__}); "
                         "give an mp4, mkv, webm, mov or avi file") from None
    if not picked:
        raise VideoError(f"{name}: the video stream contains no decodable frames")
    images = [_to_image(frame, size) for frame in picked]
    return images, targets[: len(images)], float(duration)


def _frames_at(frames, targets: list[float]) -> list:
    """For each target time, the last frame that starts at or before it (the frame on screen at that time)."""
    picked, previous, i = [], None, 0
    for frame in frames:
        t = frame.time if frame.time is not None else 0.0
        while i < len(targets) and t > targets[i] + 1e-6:
            picked.append(previous if previous is not None else frame)
            i += 1
        if i == len(targets):
            break
        previous = frame
    picked += [previous] * (len(targets) - i) if previous is not None else []
    return picked


def _to_image(frame, size: int | None):
    from PIL import Image

    image = frame.to_image().convert("RGB")
    return image if size is None else image.resize((size, size), Image.BILINEAR)


def _duration(container, stream) -> float | None:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    if stream.frames and stream.average_rate:
        return float(stream.frames / stream.average_rate)
    return None


def _frame_step(stream) -> float:
    return float(1 / stream.average_rate) if stream.average_rate else 0.0


def _sound_track(data, name: str) -> np.ndarray | None:
    try:
        decoded = decode_audio_track(_rewind(data), name)
    except AudioError:
        raise
    except Exception as e:
        raise VideoError(f"{name}: cannot decode the sound track ({str(e).strip() or type(e).__name__})") from None
    if decoded is None or decoded[0].shape[0] == 0:
        return None
    samples, rate = decoded
    return resample(to_mono(samples), rate)


def _open(source: Any, name: str, allow_network: bool):
    try:
        data = read_source(source, "video", MediaPolicy(allow_network=allow_network))
    except MediaError as e:
        raise VideoError(str(e)) from None
    return str(data) if isinstance(data, Path) else io.BytesIO(data)


def _rewind(data):
    if not isinstance(data, str):
        data.seek(0)
    return data
