"""A word-level tokenizer for the tiny checkpoints that spells Gemma's turn roles as words of its own (so the
assistant turns can be told from the user turns), and small JSONL files in ms-swift's format."""
from __future__ import annotations

import json
from pathlib import Path

from tests.reference.tiny import TINY_SPECIAL_TOKENS

ROLE_WORDS = {10: "user", 11: "model", 12: "system"}


def write_turn_tokenizer(folder: Path, vocab_size: int = 512, special: dict | None = None) -> None:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE
    special = special or TINY_SPECIAL_TOKENS
    names = {**ROLE_WORDS, **special}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(special[i], special=True) for i in sorted(special)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA3N_CHAT_TEMPLATE}))


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path
