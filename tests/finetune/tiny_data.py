"""A word-level tokenizer for the tiny checkpoints that spells Gemma's turn roles as words of its own (so the
assistant turns can be told from the user turns), and small JSONL files in ms-swift's format."""
from __future__ import annotations

import json
from pathlib import Path

from tests.reference.tiny import write_tiny_tokenizer

ROLE_WORDS = {10: "user", 11: "model", 12: "system"}


def write_turn_tokenizer(folder: Path, vocab_size: int = 512, special: dict | None = None) -> None:
    write_tiny_tokenizer(folder, vocab_size, special, words=ROLE_WORDS)


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
