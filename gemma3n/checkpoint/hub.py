"""Resolve a Hugging Face Hub id ("google/gemma-3n-E2B-it") to a snapshot folder already in the local cache.

Nothing is downloaded: the runtime works offline, and a model that is not cached gets a message saying how to
fetch it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).exists()


def hub_cache_dir() -> Path:
    """The cache folder the `huggingface_hub` library uses, honouring its environment variables."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve_cached(repo_id: str, revision: str = "main") -> Path:
    """The snapshot folder of `repo_id` in the local cache; FileNotFoundError with advice if absent."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / revision
    if ref.is_file():
        folder = snapshots / ref.read_text().strip()
        if (folder / "config.json").exists():
            return folder
    candidates = sorted((p for p in snapshots.glob("*") if (p / "config.json").exists()),
                        key=lambda p: p.stat().st_mtime, reverse=True) if snapshots.is_dir() else []
    if candidates:
        return candidates[0]
    raise FileNotFoundError(
        f"'{repo_id}' is neither a local path nor a model in the Hugging Face cache ({hub_cache_dir()}); "
        f"download it first, e.g. `huggingface-cli download {repo_id}`, or pass a folder or .gguf file")
