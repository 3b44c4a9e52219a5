"""What a server accepts: every limit a request can break, and the switches that widen what it may do."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class ServerSettings:
    """Limits and switches of one server; each limit is a `gemma3n serve` flag of the same name."""

    model_name: str = "gemma3n"  # the id /v1/models lists and requests must name
    api_key: str | None = None  # when set, every /v1 request needs "Authorization: Bearer <key>"
    allow_remote_media: bool = False  # fetch http(s) image / audio URLs (off: only data: URLs and uploads)
    max_body_bytes: int = 32 * MiB  # a request body larger than this gets 413
    max_prompt_tokens: int = 8192  # prompt tokens after the chat template (also capped by the model's context)
    max_tokens: int = 2048  # the most new tokens a request may ask for
    # new tokens of a chat request that does not say (a CPU answer of max_tokens could run for minutes; the
    # finish_reason "length" tells the client when an answer was cut)
    default_max_tokens: int = 512
    max_images: int = 8  # image parts per request
    max_audios: int = 4  # audio parts per request
    max_media_bytes: int = 20 * MiB  # one decoded image or audio file
    max_image_pixels: int = 40_000_000  # width x height of one image (guards against decompression bombs)
    max_audio_seconds: float = 30.0  # one audio clip (Gemma 3n hears 30 s per clip)
    max_batch: int = 32  # sequences decoded together; more requests wait in a first-come queue
    max_queue: int = 256  # requests waiting beyond max_batch; more get 429
    remote_timeout_seconds: float = 10.0  # fetching one remote media URL
    # K/V of earlier prompts and answers kept for requests that begin the same way (MiB; 0 turns it off)
    prefix_cache_mb: int = 1024
    # on SIGTERM / SIGINT: stop accepting, let running requests finish for at most this long, then exit
    drain_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_tokens", "max_tokens", "default_max_tokens", "max_media_bytes",
                     "max_image_pixels", "max_batch", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("max_images", "max_audios"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        for name in ("prefix_cache_mb",):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not self.drain_seconds >= 0:
            raise ValueError(f"drain_seconds must be >= 0, got {self.drain_seconds!r}")
        if not self.max_audio_seconds > 0 or not self.remote_timeout_seconds > 0:
            raise ValueError("max_audio_seconds and remote_timeout_seconds must be > 0")
        if self.default_max_tokens > self.max_tokens:
            object.__setattr__(self, "default_max_tokens", self.max_tokens)  # a lower --max-tokens caps it too
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty; leave it unset to serve without a key")
