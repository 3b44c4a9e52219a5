"""OpenAI content parts -> Hugging Face chat items, decoding the media they carry.

Images come as data: URLs (or, only when the server allows remote media, http(s) URLs); audio as base64 wav / mp3.
Nothing a request names is ever read from the local disk: a URL with any other scheme, or a plain path, is refused.
Every failure is a 400 that says which part was wrong.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.request
from dataclasses import dataclass, field
from typing import Any

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
        out.messages.append({"role": role, "content": content})
    return out


def _convert_part(part, where: str, settings: ServerSettings, out: Converted) -> dict:
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    if isinstance(part, ImagePart):
        out.admit("image", settings.max_images, "images", where)
        data = image_bytes(part.image_url.url, where, settings)
        decode_image(data, where, settings)
        # The checked bytes, not the decoded image, go on: the processor then reads them as the reference reads a
        # URL (EXIF orientation applied), whereas an in-memory image would be taken as it is.
        return {"type": "image", "image": data}
    assert isinstance(part, AudioPart)
    out.admit("audio", settings.max_audios, "audio clips", where)
    data = b64decode(part.input_audio.data, where, settings)
    check_audio(data, where, settings)
    return {"type": "audio", "audio": data}


def b64decode(text: str, where: str, settings: ServerSettings) -> bytes:
    if len(text) > settings.max_media_bytes * 4 // 3 + 4:
        raise APIError(413, f"{where}: the media is larger than the limit of {settings.max_media_bytes} bytes",
                       param=where)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data is not valid base64", param=where) from None


def image_bytes(url: str, where: str, settings: ServerSettings) -> bytes:
    """The bytes behind an image URL: a data: URL, or http(s) when allowed. Never a local file."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(f"{where}: a data: URL must look like data:image/png;base64,<base64 data>", param=where)
        return b64decode(payload, where, settings)
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_media:
            raise bad_request(f"{where}: remote image URLs are disabled on this server; send the image inline as a "
                              "data: URL (or start the server with --allow-remote-media)", param=where)
        return fetch(url, where, settings)
    raise bad_request(f"{where}: only data: URLs (and http(s) URLs when the server allows remote media) are "
                      "accepted; local files are never read", param=where)


def fetch(url: str, where: str, settings: ServerSettings) -> bytes:
    """GET a remote media URL with a timeout and a size cap (only called with --allow-remote-media)."""
    request = urllib.request.Request(url, headers={"User-Agent": "gemma3n-server"})
    try:
        with urllib.request.urlopen(request, timeout=settings.remote_timeout_seconds) as response:
            if not response.geturl().startswith(("http://", "https://")):
                raise bad_request(f"{where}: the URL redirected away from http(s)", param=where)
            data = response.read(settings.max_media_bytes + 1)
    except APIError:
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, bad URLs: all mean "could not fetch"
        raise bad_request(f"{where}: could not fetch {url[:200]} ({e})", param=where) from None
    if len(data) > settings.max_media_bytes:
        raise APIError(413, f"{where}: the media is larger than the limit of {settings.max_media_bytes} bytes",
                       param=where)
    return data


def decode_image(data: bytes, where: str, settings: ServerSettings) -> Any:
    """Bytes -> a loaded PIL image (a full decode, so a truncated file is caught here), refusing what is not an
    image or has too many pixels."""
    try:
        from PIL import Image
    except ImportError:
        raise bad_request("image input needs the pillow package on the server (pip install pillow)") from None
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > settings.max_image_pixels:
            raise bad_request(f"{where}: the image is {width}x{height}; at most {settings.max_image_pixels} pixels "
                              "are accepted", param=where)
        image.load()
    except APIError:
        raise
    except Exception as e:  # PIL raises many types for broken or unknown files
        raise bad_request(f"{where}: the data is not a readable image ({_reason(e)}); "
                          "send a PNG, JPEG, GIF or WebP", param=where) from None
    return image


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
