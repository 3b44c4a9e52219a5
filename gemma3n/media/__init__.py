"""Where media bytes come from: one reader for images, audio, video and the server (media/source.py)."""
from .source import MediaError, MediaPolicy, describe, read_source

__all__ = ["MediaError", "MediaPolicy", "describe", "read_source"]
