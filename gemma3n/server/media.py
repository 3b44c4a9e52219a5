"""OpenAI content parts -> Hugging Face chat items, decoding the media they carry.

Images come as data: URLs (or, only when the server allows remote media, http(s) URLs); audio as base64 wav / mp3.
Nothing a request names is ever read from the local disk: a URL with any other scheme, or a plain path, is refused.
Every failure is a 400 that says which part was wrong.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Any

from ..media import MediaError, MediaPolicy, read_source
from .errors import APIError, bad_request
from .schemas import AudioPart, ImagePart, Message, TextPart
from .settings import ServerSettings


@dataclass
class Converted:
    """HF-format messages plus what they hold."""

    messages: list[dict]
    media: list[str] = field(default_factory=list)  # "image" / "audio", in order

    @property
    def has_media(self) -> bool:
        return bool(self.media)

    def admit(self, kind: str, limit: int, noun: str, where: str) -> None:
        """Count one more `kind` part, refusing the request past `limit` of them."""
        if self.media.count(kind) >= limit:
            raise bad_request(f"too many {noun}: at most {limit} per request", param=where)
        self.media.append(kind)


def convert_messages(messages: list[Message], settings: ServerSettings) -> Converted:
    """Validate the limits and decode every media part. Text-only contents become plain strings."""
    out = Converted(messages=[])
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None:
            content = ""
        if isinstance(content, list):
            items = [_convert_part(part, f"messages[{i}].content[{j}]", settings, out)
                     for j, part in enumerate(content)]
            content = "".join(it["text"] for it in items) if all(it["type"] == "text" for it in items) else items
        extra = {}
        if message.tool_calls:
            extra["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id is not None:
            extra["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            extra["name"] = message.name
        out.messages.append({"role": role, "content": content, **extra})
    return out


def _convert_part(part, where: str, settings: ServerSettings, out: Converted) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        out.admit("image", settings.max_images, "images", where)
        return {"type": "image", "image": decode_image(part.image_url.url, where, settings)}
    assert isinstance(part, AudioPart)
    out.admit("audio", settings.max_audios, "audio clips", where)
    data = read_media(f"data:audio;base64,{part.input_audio.data}", "audio", where, settings)
    check_audio(data, where, settings)
    return {"type": "audio", "audio": data}


def media_policy(settings: ServerSettings) -> MediaPolicy:
    """What a request may make the server read: inline data always, http(s) only with --allow-remote-media (with
    the size cap and timeout), local files never."""
    return MediaPolicy(allow_files=False, allow_network=settings.allow_remote_media,
                       max_bytes=settings.max_media_bytes, timeout_seconds=settings.remote_timeout_seconds,
                       network_hint="send it inline as a data: URL (or start the server with --allow-remote-media)")


def read_media(source: str, kind: str, where: str, settings: ServerSettings) -> bytes:
    """The bytes of a request's media (media/source.py), or the 400 / 413 that says what was wrong."""
    try:
        return read_source(source, kind, media_policy(settings))
    except MediaError as e:
        raise APIError(e.status, f"{where}: {e}", param=where) from None


def decode_image(url: str, where: str, settings: ServerSettings) -> Any:
    """An image URL -> the RGB image the processor takes (decoded once, here, with the EXIF orientation applied as
    the reference applies it to a URL), refusing what is not an image or has too many pixels."""
    data = read_media(url, "image", where, settings)
    try:
        from PIL import Image
        from ..processor.image import ImageError, load_image
    except ImportError:
        raise bad_request("image input needs the pillow package on the server (pip install pillow)") from None
    try:
        width, height = Image.open(io.BytesIO(data)).size  # the header only: refuse a pixel bomb before decoding it
    except Exception as e:  # PIL raises many types for broken or unknown files
        raise bad_request(f"{where}: the data is not a readable image ({_reason(e)}); "
                          "send a PNG, JPEG, GIF or WebP", param=where) from None
    if width * height > settings.max_image_pixels:
        raise bad_request(f"{where}: the image is {width}x{height}; at most {settings.max_image_pixels} pixels "
                          "are accepted", param=where)
    try:
        return load_image(data)
    except ImageError as e:
        raise bad_request(f"{where}: the data is not a readable image ({_reason(e)}); "
                          "send a PNG, JPEG, GIF or WebP", param=where) from None


def check_audio(data: bytes, where: str, settings: ServerSettings) -> float:
    """Duration in seconds of wav / mp3 / flac / ogg bytes; refuses unreadable or too long audio."""
    try:
        import soundfile
    except ImportError:
        raise bad_request("audio input needs the soundfile package on the server (pip install soundfile)") from None
    try:
        info = soundfile.info(io.BytesIO(data))
        seconds = info.frames / info.samplerate
    except Exception as e:  # libsndfile errors for anything it cannot parse
        raise bad_request(f"{where}: the data is not readable audio ({_reason(e)}); send wav, mp3, flac or ogg",
                          param=where) from None
    if seconds > settings.max_audio_seconds:
        raise bad_request(f"{where}: the audio lasts {seconds:.1f} s; at most {settings.max_audio_seconds:g} s "
                          "per clip are accepted", param=where)
    return seconds


def _reason(error: Exception) -> str:
    """A decoder's error, first line, without the in-memory file object it names (PIL and libsndfile both print
    "<_io.BytesIO object at 0x...>", which means nothing to the client)."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r" ?<_io\.\w+ object at 0x[0-9a-fA-F]+>", "", text)
