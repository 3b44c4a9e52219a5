"""The bytes behind a media source, read one way for every kind of media and every caller.

A source is bytes, a binary file object, a local path, a `data:` URL (base64 or percent-encoded), an http(s) URL
or (for images, as transformers accepts) bare base64 text. What a caller may read is its `MediaPolicy`: the CLI and
the Python API read local files and refuse the network unless asked; the server never reads local files, fetches
URLs only when started with --allow-remote-media, and caps sizes and waiting. Decoding the bytes is the caller's
(processor/image.py, audio.py, video.py): this module only says where they come from, and fails with a message that
names the source and says what to do.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_BARE_BASE64 = re.compile(r"^[A-Za-z0-9+/=\s]{64,}$")


class MediaError(ValueError):
    """A media source that cannot be read; `status` is the HTTP status a server answers with (413: too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class MediaPolicy:
    allow_files: bool = True            # local paths (never for a server: a request must not read its disk)
    allow_network: bool = False         # http(s) URLs
    allow_bare_base64: bool = False     # base64 text that is not a data: URL (transformers' load_image takes it)
    max_bytes: int | None = None        # refuse larger media (413)
    timeout_seconds: float = 30.0       # for http(s)
    network_hint: str = "allow network access (allow_network=True)"  # how the caller turns the network on


def describe(source: Any) -> str:
    """A short human name for a source, for error messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    if isinstance(source, str) and source.startswith("data:"):
        return f"{source.partition(',')[0][:60]},... ({len(source)} characters)"
    if isinstance(source, str) and len(source) > 200:
        return f"{source[:60]}... ({len(source)} characters)"
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    shape = getattr(source, "shape", None)
    if shape is not None:
        return f"{type(source).__name__} of shape {tuple(shape)}"
    return type(source).__name__


def read_source(source: Any, kind: str, policy: MediaPolicy = MediaPolicy()) -> bytes | Path:
    """The encoded bytes of `source`, or the checked path of a local file (decoders open files themselves).

    `kind` ("image", "audio", "video") names the media in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _checked(bytes(source), kind, f"the {kind} bytes", policy)
    if hasattr(source, "read"):
        return _checked(source.read(), kind, f"the {kind} file object", policy)
    if not isinstance(source, (str, os.PathLike)):
        raise MediaError(f"cannot read {_a(kind)} from a {type(source).__name__}: pass a path, bytes or a data: URL")
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    name = describe(text)
    if text.startswith("data:"):
        return _checked(_data_url(text, kind, name, policy), kind, name, policy)
    if text.startswith(("http://", "https://")):
        return _download(text, kind, policy)
    if "://" in text[:16]:
        where = f"download the {kind} and pass its path" if policy.allow_files else \
            f"local files are never read here; send the {kind} inline (a base64 data: URL)"
        raise MediaError(f"{name}: only http(s) and data: URLs are read; {where}")
    if policy.allow_bare_base64 and _BARE_BASE64.match(text) and not _is_file(text):
        return _checked(_base64(text, kind, name, policy), kind, name, policy)
    if not policy.allow_files:
        raise MediaError(f"{name}: local files are never read here; send the {kind} inline (a base64 data: URL)")
    path = Path(text).expanduser()
    if not _is_file(path):
        if path.exists():
            raise MediaError(f"{kind} path {text} is not a file: pass the path of {_a(kind)} file")
        raise MediaError(f"{kind} file not found: {text} (check the path)")
    size = path.stat().st_size
    if size == 0:
        raise MediaError(f"{name}: the file is empty (0 bytes)")
    if policy.max_bytes is not None and size > policy.max_bytes:
        raise MediaError(f"{name}: the {kind} is larger than the limit of {policy.max_bytes} bytes", 413)
    return path


def _a(kind: str) -> str:
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _is_file(path) -> bool:
    try:
        return Path(path).expanduser().is_file()
    except OSError:  # e.g. a name too long to be a path
        return False


def _checked(data: bytes, kind: str, name: str, policy: MediaPolicy) -> bytes:
    if not data:
        raise MediaError(f"{name}: the {kind} data is empty (0 bytes); pass the contents of {_a(kind)} file")
    if policy.max_bytes is not None and len(data) > policy.max_bytes:
        raise MediaError(f"{name}: the {kind} is larger than the limit of {policy.max_bytes} bytes", 413)
    return data


def _base64(text: str, kind: str, name: str, policy: MediaPolicy) -> bytes:
    if policy.max_bytes is not None and len(text) > policy.max_bytes * 4 // 3 + 4:
        raise MediaError(f"{name}: the {kind} is larger than the limit of {policy.max_bytes} bytes", 413)
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise MediaError(f"{name}: invalid base64 {kind} data ({e}); encode the file's bytes with base64") from None


def _data_url(url: str, kind: str, name: str, policy: MediaPolicy) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise MediaError(f"{name}: malformed data: URL (no ','); expected data:{kind}/...;base64,<base64 data>")
    if header.endswith(";base64"):
        return _base64(payload, kind, name, policy)
    return urllib.parse.unquote_to_bytes(payload)


def _download(url: str, kind: str, policy: MediaPolicy) -> bytes:
    if not policy.allow_network:
        raise MediaError(f"{url[:200]}: reading {kind} from the network is off; download the file and pass it "
                         f"inline, or {policy.network_hint}")
    request = urllib.request.Request(url, headers={"User-Agent": "gemma3n"})
    limit = policy.max_bytes
    try:
        with urllib.request.urlopen(request, timeout=policy.timeout_seconds) as response:
            if not response.geturl().startswith(("http://", "https://")):
                raise MediaError(f"{url[:200]}: the URL redirected away from http(s)")
            data = response.read() if limit is None else response.read(limit + 1)
    except MediaError:
        raise
    except Exception as e:  # URLError, HTTPError, timeouts, malformed URLs: all mean "could not fetch"
        raise MediaError(f"{url[:200]}: download failed ({e}); check the URL or download the file yourself") \
            from None
    return _checked(data, kind, url[:200], policy)
