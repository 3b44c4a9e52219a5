"""Training data: ms-swift's JSONL, checked line by line, encoded as inference encodes prompts, with label masks.

One JSON object a line, either a conversation
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "<image>What is this?"},
                  {"role": "assistant", "content": "A cat."}], "images": ["cat.jpg"], "audios": []}
whose `<image>` / `<audio>` tags take the listed media in order (paths relative to the JSONL file, http(s) URLs
when allowed, base64 or data: URLs), or plain text for continued pre-training: {"text": "..."}.

Conversations are rendered with the checkpoint's chat template (Gemma's turn format when it has none) and their
media processed by the same Processor as inference; the loss is on the assistant turns only (ms-swift's default):
the tokens after each `<start_of_turn>model\\n` up to and including its `<end_of_turn>`. Text lines are trained on
every token, with EOS appended.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE = -100  # label of a token that carries no loss (transformers' and PyTorch's convention)
TAGS = {"<image>": ("image", "images"), "<audio>": ("audio", "audios"), "<video>": ("video", "videos")}
_TAG = re.compile("(" + "|".join(map(re.escape, TAGS)) + ")")
_ROLES = ("system", "user", "assistant")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")
MAX_REPORTED_ERRORS = 20


class DataError(ValueError):
    """Bad training data: every bad line with its number and the reason."""


@dataclass
class Example:
    line: int  # 1-based line number in its file
    messages: list[dict] | None = None  # HF-format messages, media as parts
    text: str | None = None


@dataclass
class Encoded:
    line: int
    input_ids: list[int]
    labels: list[int]
    media: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values / input_features(_mask)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_jsonl(path: str | Path, allow_network: bool = False) -> list[Example]:
    """Every line of `path` checked; raises DataError listing the bad lines (all of them are checked first)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file; pass a JSONL file (one JSON object a line)")
    examples, errors = [], []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                examples.append(parse_line(raw, number, path.parent, allow_network))
            except (ValueError, TypeError) as e:
                errors.append(f"{path}:{number}: {e}")
    if errors:
        raise DataError(_summary(errors))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _summary(errors: list[str]) -> str:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = f"\n... and {len(errors) - len(shown)} more bad lines" if len(errors) > len(shown) else ""
    return f"{len(errors)} bad line{'s' if len(errors) > 1 else ''} in the training data:\n" + "\n".join(shown) + more


def parse_line(raw: str, number: int, folder: Path, allow_network: bool = False) -> Example:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(item, dict):
        raise ValueError(f"expected a JSON object, got {type(item).__name__}")
    if "messages" in item:
        return Example(number, messages=_messages(item, folder, allow_network))
    if "text" in item:
        if not isinstance(item["text"], str) or not item["text"].strip():
            raise ValueError("'text' must be a non-empty string")
        return Example(number, text=item["text"])
    raise ValueError("needs 'messages' (a conversation) or 'text' (plain text); found keys "
                     + ", ".join(map(repr, item)) if item else "the object is empty; it needs 'messages' or 'text'")


def _messages(item: dict, folder: Path, allow_network: bool) -> list[dict]:
    messages = item["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    media = {key: _media_list(item, key, folder, allow_network) for _, key in TAGS.values()}
    used = {key: 0 for key in media}
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in _ROLES:
            raise ValueError(f"message {i}: role {role!r} is not one of {', '.join(_ROLES)}")
        if role == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        if not isinstance(content, str):
            raise ValueError(f"message {i}: 'content' must be a string (media go in images/audios, referenced by "
                             f"<image> / <audio> tags)")
        if role == "assistant" and _TAG.search(content):
            raise ValueError(f"message {i}: an assistant turn cannot hold media tags")
        out.append({"role": role, "content": _content(content, media, used, i)})
    turns = [m["role"] for m in out if m["role"] != "system"]
    for j, role in enumerate(turns):
        if role != ("user" if j % 2 == 0 else "assistant"):
            raise ValueError("turns must alternate user/assistant, starting with user (after an optional system)")
    if "assistant" not in turns:
        raise ValueError("no assistant turn: there is nothing to learn from this conversation")
    for key, sources in media.items():
        if used[key] != len(sources):
            tag = next(t for t, (_, k) in TAGS.items() if k == key)
            raise ValueError(f"{len(sources)} {key} listed but {used[key]} {tag} tags in the messages; they must match")
    return out


def _media_list(item: dict, key: str, folder: Path, allow_network: bool) -> list[str]:
    sources = item.get(key) or []
    if isinstance(sources, str):
        sources = [sources]
    if not isinstance(sources, list) or not all(isinstance(s, str) and s for s in sources):
        raise ValueError(f"'{key}' must be a list of paths, URLs or base64 strings")
    resolved = []
    for source in sources:
        if source.startswith(("http://", "https://")):
            if not allow_network:
                raise ValueError(f"{key}: {source} is a URL; pass --allow-network to fetch media")
            resolved.append(source)
        elif source.startswith("data:"):
            resolved.append(source)
        else:
            path = _existing(source, folder)
            if path is not None:
                resolved.append(str(path))
            elif _BASE64.fullmatch(source) and len(source) >= 64:  # bare base64, as ms-swift accepts
                resolved.append(source)
            else:
                raise ValueError(f"{key}: file not found: {source} (relative paths are read from {folder})")
    return resolved


def _existing(source: str, folder: Path) -> Path | None:
    try:
        path = Path(source).expanduser()
        path = path if path.is_absolute() or not (folder / path).exists() else folder / path
        return path if path.is_file() else None
    except OSError:  # a name too long to be a path
        return None


def _content(text: str, media: dict, used: dict, index: int) -> str | list[dict]:
    if not _TAG.search(text):
        return text
    parts = []
    for piece in _TAG.split(text):
        if piece in TAGS:
            kind, key = TAGS[piece]
            if used[key] >= len(media[key]):
                raise ValueError(f"message {index}: more {piece} tags than {key} listed")
            parts.append({"type": kind, kind: media[key][used[key]]})
            used[key] += 1
        elif piece.strip():
            parts.append({"type": "text", "text": piece})
    return parts


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random `fraction` held out (at least one example when fraction > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return examples, []
    count = max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise ValueError(f"--val-fraction {fraction} leaves no training examples out of {len(examples)}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class Encoder:
    """Examples -> token ids, labels and media tensors, through the model's own processor."""

    def __init__(self, model, max_length: int):
        self.model, self.max_length = model, max_length
        tok = model.tokenizer
        if tok is None:
            raise ValueError(f"{model.path} has no tokenizer, so text cannot be encoded for training")
        self.tokenizer = tok
        self.turn_start = tok.encode("<start_of_turn>model\n")
        self.turn_end = tok.token_to_id("<end_of_turn>")
        opens = tok.token_to_id("<start_of_turn>")
        if self.turn_end is None or len(self.turn_start) < 2 or self.turn_start[0] != opens:
            raise ValueError("this tokenizer has no Gemma turn tokens (<start_of_turn>, <end_of_turn>), so the "
                             "assistant turns cannot be found; train on {\"text\": ...} lines instead")

    def encode_all(self, examples: list[Example], where: str) -> list[Encoded]:
        """Every example encoded (media decoded and preprocessed); raises DataError listing every failure."""
        encoded, errors = [], []
        for example in examples:
            try:
                encoded.append(self.encode(example))
            except (ValueError, TypeError, OSError) as e:
                errors.append(f"{where}:{example.line}: {e}")
        if errors:
            raise DataError(_summary(errors))
        return encoded

    def encode(self, example: Example) -> Encoded:
        if example.text is not None:
            ids = self.tokenizer.encode(example.text, add_special_tokens=True)
            eos = self.tokenizer.eos_id
            ids = ids + ([eos] if eos is not None else [])
            return self._fit(Encoded(example.line, ids, list(ids)))
        inputs = self.model.processor(example.messages, add_generation_prompt=False)
        ids = inputs.pop("input_ids")[0].tolist()
        inputs.pop("attention_mask", None)
        labels = self.assistant_labels(ids)
        found = sum(1 for t in labels if t == self.turn_end)
        wanted = sum(1 for m in example.messages if m["role"] == "assistant")
        if found != wanted:
            raise ValueError(f"found {found} assistant turns in the rendered conversation, expected {wanted}; the "
                             f"chat template does not write Gemma turns")
        return self._fit(Encoded(example.line, ids, labels, {k: v.cpu() for k, v in inputs.items()}))

    def assistant_labels(self, ids: list[int]) -> list[int]:
        """ids with every token outside the assistant turns replaced by IGNORE."""
        labels, start, n = [IGNORE] * len(ids), self.turn_start, len(self.turn_start)
        i = 0
        while i < len(ids):
            if ids[i:i + n] == start:
                j = i + n
                while j < len(ids):
                    labels[j] = ids[j]
                    j += 1
                    if ids[j - 1] == self.turn_end:
                        break
                i = j
            else:
                i += 1
        return labels

    def _fit(self, item: Encoded) -> Encoded:
        if len(item.input_ids) > self.max_length:
            if item.media:
                raise ValueError(f"{len(item.input_ids)} tokens with media, more than --max-length "
                                 f"{self.max_length}; raise --max-length (media runs cannot be cut)")
            item.input_ids, item.labels = item.input_ids[:self.max_length], item.labels[:self.max_length]
        if item.trained_tokens == 0:
            raise ValueError(f"no assistant tokens within the first {self.max_length} tokens; raise --max-length")
        return item


def collate(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels (IGNORE on padding) and attention mask; media concatenated in row order (audio
    features padded to the longest clip, padding marked invalid, as the feature extractor pads a batch)."""
    width = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, e in enumerate(items):
        n = len(e.input_ids)
        ids[row, :n], labels[row, :n], mask[row, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [e.media["pixel_values"] for e in items if "pixel_values" in e.media]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    clips = [(e.media["input_features"], e.media["input_features_mask"]) for e in items if "input_features" in e.media]
    if clips:
        frames = max(f.shape[1] for f, _ in clips)
        batch["input_features"] = torch.cat([torch.nn.functional.pad(f, (0, 0, 0, frames - f.shape[1]))
                                             for f, _ in clips])
        batch["input_features_mask"] = torch.cat([torch.nn.functional.pad(m, (0, frames - m.shape[1]), value=False)
                                                  for _, m in clips])
    return batch
