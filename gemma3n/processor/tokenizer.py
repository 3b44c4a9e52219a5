"""Gemma tokenizer: text <-> ids, from a Hugging Face tokenizer.json or from the vocabulary inside a GGUF file.

Both paths end in a `tokenizers.Tokenizer` that reproduces transformers' `GemmaTokenizer`: a BPE model with byte
fallback, spaces spelled "▁" by the normalizer, control tokens (`<start_of_turn>`, `<image_soft_token>`, ...) matched
whole in the text before BPE runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from ..checkpoint.gguf_file import GGUFFile

_STRING, _ARRAY = 8, 9  # GGUF value types, for an open gguf.GGUFReader's fields

# Texts longer than this are encoded without holding the GIL, so a server's other threads (its event loop) run on.
GIL_FREE_CHARS = 4096

_SPACE = "\u2581"  # SentencePiece's visible space "▁"

# Names the Gemma vocabularies use; a checkpoint's own config overrides them.
_DEFAULT_NAMES = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}

# GGUF architectures whose "llama" (SentencePiece) vocabulary is Gemma's: no prefix space, no merge table.
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma3n", "gemma-embedding")

# llama.cpp token types (tokenizer.ggml.token_type)
_CONTROL, _USER_DEFINED = 3, 4

_GGUF_KEYS = {
    "arch": "general.architecture",
    "model": "tokenizer.ggml.model",
    "tokens": "tokenizer.ggml.tokens",
    "types": "tokenizer.ggml.token_type",
    "merges": "tokenizer.ggml.merges",
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "pad": "tokenizer.ggml.padding_token_id",
    "add_bos": "tokenizer.ggml.add_bos_token",
    "add_eos": "tokenizer.ggml.add_eos_token",
    "template": "tokenizer.chat_template",
}



def check_unicode(text: str, what: str = "the text") -> None:
    """Refuse a str that is not valid Unicode (a lone surrogate: undecodable input bytes, or a JSON "\\udcff"
    escape), which no tokenizer can encode, with the place where it is."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid Unicode: a lone surrogate U+{ord(text[e.start]):04X} at character "
                         f"{e.start} (input that was not UTF-8?); send UTF-8 text") from None

class Tokenizer:
    """Gemma tokenizer over a `tokenizers.Tokenizer` backend, plus the checkpoint's chat template."""

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None = "<bos>",
        eos_token: str | None = "<eos>",
        pad_token: str | None = "<pad>",
        chat_template: str | None = None,
    ):
        self.backend = backend  # read-only after construction: the two values below are computed once from it
        self.chat_template = chat_template
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        # cached: each backend query walks the 262k vocabulary (0.4 ms and 12 ms), too slow per decoded token
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._special_ids = frozenset(i for i, tok in backend.get_added_tokens_decoder().items() if tok.special)
        self._max_token_chars: int | None = None

    # ---- construction -------------------------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | os.PathLike, chat_template: str | None = None, **names: str | None) -> Tokenizer:
        """Load a Hugging Face `tokenizer.json`; bos_token / eos_token / pad_token override Gemma's names."""
        unknown = sorted(set(names) - set(_DEFAULT_NAMES))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}; names are bos_token, eos_token, "
                            "pad_token")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            backend = _Backend.from_file(str(path))
        except Exception as exc:  # the Rust parser raises a bare Exception with a multi-line message
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path} is not a valid tokenizer.json ({reason})") from None
        return cls(backend, chat_template=chat_template, **_resolve_names(names, backend))

    @classmethod
    def from_pretrained_dir(cls, folder: str | os.PathLike) -> Tokenizer:
        """Load tokenizer.json from a checkpoint folder, with its special token names and chat template."""
        folder = Path(folder)
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}; expected a Hugging Face checkpoint folder")
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        # tokenizer_config wins over the legacy special_tokens_map, as in transformers
        names = {k: _token_text(config.get(k, special_map.get(k))) for k in ("bos_token", "eos_token", "pad_token")}
        names = {k: v for k, v in names.items() if v is not None}
        return cls.from_file(folder / "tokenizer.json", chat_template=_find_chat_template(folder, config), **names)

    @classmethod
    def from_gguf(cls, source: str | os.PathLike | Any) -> Tokenizer:
        """Rebuild the tokenizer from a GGUF file's vocabulary: a path, a parsed `GGUFFile` (what loading passes, so
        the file is parsed once) or an open `gguf.GGUFReader`."""
        if isinstance(source, GGUFFile):
            meta, where = source.metadata, str(source.path)
        elif hasattr(source, "fields"):  # an already-open GGUFReader: reuse it instead of parsing the file again
            meta = _metadata_from_reader(source)
            where = str(getattr(getattr(source, "data", None), "filename", None) or "the GGUF reader")
        else:
            meta, where = read_gguf_metadata(source), str(source)
        if meta.get(_GGUF_KEYS["tokens"]) is None:
            raise ValueError(f"{where} holds no tokenizer vocabulary (no {_GGUF_KEYS['tokens']} key)")
        kind, arch = meta.get(_GGUF_KEYS["model"]), meta.get(_GGUF_KEYS["arch"])
        if kind != "llama" or arch not in _GEMMA_ARCHITECTURES:
            raise ValueError(
                f"{where}: tokenizer {kind!r} of architecture {arch!r} is not supported; "
                f"only Gemma SentencePiece vocabularies ({', '.join(_GEMMA_ARCHITECTURES)}) are"
            )
        tokens, token_types = meta[_GGUF_KEYS["tokens"]], meta.get(_GGUF_KEYS["types"]) or []
        if token_types and len(token_types) != len(tokens):
            raise ValueError(f"{where}: {len(token_types)} token types for {len(tokens)} tokens; the file is corrupt")
        names = {f"{k}_token": _token_at(tokens, meta.get(_GGUF_KEYS[k])) for k in ("bos", "eos", "pad", "unk")}
        backend = _gemma_backend(
            tokens,
            token_types,
            meta.get(_GGUF_KEYS["merges"]),
            unk_token=names.pop("unk_token") or "<unk>",
            # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise; transformers agrees
            bos=names["bos_token"] if meta.get(_GGUF_KEYS["add_bos"], True) else None,
            eos=names["eos_token"] if meta.get(_GGUF_KEYS["add_eos"], False) else None,
        )
        return cls(backend, chat_template=meta.get(_GGUF_KEYS["template"]), **names)

    # ---- text <-> ids -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; add_special_tokens=True adds what the checkpoint's post-processor adds (BOS)."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        check_unicode(text)
        if len(text) > GIL_FREE_CHARS:  # encode_batch releases the GIL while it works; encode holds it throughout
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    @property
    def max_token_chars(self) -> int:
        """The most characters one token spells: a text of n characters is at least n / this many tokens, which
        lets a server refuse a prompt far over its token limit without spending seconds tokenizing it."""
        if self._max_token_chars is None:
            backend = self.backend
            self._max_token_chars = max(len(backend.id_to_token(i) or "") for i in range(self._vocab_size))
        return self._max_token_chars

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list, or a 1-D tensor / array)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self._vocab_size - 1})")
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # ---- properties ---------------------------------------------------------------------------------------------

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens: those decode(skip_special_tokens=True) drops."""
        return self._special_ids

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens, as transformers hands them to a chat template (bos_token=..., ...)."""
        names = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {k: v for k, v in names.items() if v is not None}

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})"


# ---- Hugging Face folder helpers --------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    """A JSON object from `path`, {} if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as written in a config: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _resolve_names(names: dict, backend: _Backend) -> dict[str, str | None]:
    """bos/eos/pad names given, else Gemma's defaults when the vocabulary has them."""
    resolved = {}
    for key in _DEFAULT_NAMES:
        default = _DEFAULT_NAMES[key] if backend.token_to_id(_DEFAULT_NAMES[key]) is not None else None
        resolved[key] = names.get(key, default)
    return resolved


def _find_chat_template(folder: Path, config: dict) -> str | None:
    """The template transformers would use: chat_template.jinja, then chat_template.json, then tokenizer_config."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # legacy multi-template form: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# ---- GGUF -> tokenizers -----------------------------------------------------------------------------------------


def _token_at(tokens: list[str], index: Any) -> str | None:
    return tokens[index] if isinstance(index, int) and 0 <= index < len(tokens) else None


def _gemma_backend(
    tokens: list[str],
    token_types: list[int],
    merges: list[str] | None,
    *,
    unk_token: str,
    bos: str | None,
    eos: str | None,
) -> _Backend:
    """A `tokenizers` BPE equivalent to transformers' GemmaTokenizer built from this vocabulary."""
    # GGUF spells whitespace-run pieces with real spaces; the normalizer turns spaces into "▁" before BPE looks them up
    pieces = [t.replace(" ", _SPACE) for t in tokens]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    if merges is not None:
        pairs = [tuple(m.split(" ")) for m in merges]
        if any(len(p) != 2 for p in pairs):
            raise ValueError("tokenizer.ggml.merges holds an entry that is not two pieces separated by a space")
    else:
        pairs = _merges_from_vocab(pieces, vocab)
    model = models.BPE(vocab=vocab, merges=pairs, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    backend = _Backend(model)
    backend.normalizer = normalizers.Replace(" ", _SPACE)
    # Never splits (spaces are already "▁" when it runs); kept so the pipeline is the Hub tokenizer.json's
    backend.pre_tokenizer = pre_tokenizers.Split(" ", "merged_with_previous")
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_control_tokens(backend, tokens, pieces, token_types)
    template = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    specials = [(t, vocab[t]) for t in (bos, eos) if t]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(template), special_tokens=specials)
    return backend


def _merges_from_vocab(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by the vocabulary, best first.

    Gemma GGUFs carry no merge table, and their scores do not follow the merge order; the piece order does. Every
    split of a piece into two vocabulary pieces becomes a merge ranked by the piece's position, longer left part
    first -- the order transformers derives, so the ids match its tokenizer exactly.
    """
    pairs = []
    for piece in pieces:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                pairs.append((left, right))
    return pairs


def _add_control_tokens(backend: _Backend, tokens: list[str], pieces: list[str], token_types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones (`<table>`, "\\n\\n") plain added tokens.

    Both are matched whole in the raw text, as llama.cpp and transformers do. User-defined whitespace runs whose
    spelling changed ("  " -> "▁▁") are left to BPE, as transformers leaves them.
    """
    if not token_types:  # a file without types marks nothing as control; transformers adds nothing either
        return
    kinds = list(zip(tokens, pieces, token_types, strict=True))
    special = [AddedToken(t, normalized=False, special=True) for t, _, k in kinds if k == _CONTROL]
    plain = [AddedToken(t, normalized=False, special=False) for t, p, k in kinds if k == _USER_DEFINED and t == p]
    backend.add_special_tokens(special)
    backend.add_tokens(plain)


# ---- GGUF metadata ----------------------------------------------------------------------------------------------

# GGUF scalar value types -> struct format (little-endian)
def read_gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value metadata of a GGUF file (checkpoint/gguf_file.py), without reading its tensors."""
    return GGUFFile(path).metadata


def _metadata_from_reader(reader: Any) -> dict[str, Any]:
    """The tokenizer keys of an open `gguf.GGUFReader`, in the same plain form as `read_gguf_metadata`."""
    meta = {}
    for key in _GGUF_KEYS.values():
        field = reader.fields.get(key)
        if field is not None:
            meta[key] = _reader_value(field)
    return meta


def _reader_value(field: Any) -> Any:
    # A ReaderField keeps raw numpy parts; `data` indexes the parts that hold values (one per array element)
    def one(index: int, kind: int) -> Any:
        part = field.parts[index]
        return bytes(part).decode("utf-8") if kind == _STRING else part[0].item()

    kinds = [int(t) for t in field.types]
    if kinds[0] == _ARRAY:
        return [one(i, kinds[1]) for i in field.data]
    return one(field.data[0], kinds[0])
