"""Grammars for constrained decoding, compiled by llguidance against the model's own tokenizer.

llguidance (the grammar engine llama.cpp and vLLM use) turns a JSON schema, a regular expression or a Lark grammar
into a matcher that, at each step, gives the set of tokens that keep the output inside the grammar. It works on the
bytes that tokens spell, so any tokenization of the output is allowed (not only the canonical one); a step's mask
over Gemma's 262k-token vocabulary, expanded into a logit bias, costs about 1 ms of CPU for JSON schemas.

`GrammarCompiler` holds, per tokenizer, llguidance's view of the vocabulary (built once: seconds for Gemma's
vocabulary) and an LRU cache of compiled grammars; a `Grammar` is one compiled grammar, and `Grammar.start()` gives
each generated row its own `RowConstraint`, the state the engine consults (engine/batch.py).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

try:  # the `structured` extra
    import llguidance
except ImportError:  # pragma: no cover - reported when a grammar is first asked for
    llguidance = None

INSTALL_HINT = "constrained decoding needs llguidance: pip install 'gemma3n[structured]'"
DEFAULT_CACHE = 64  # compiled grammars kept per tokenizer
# JSON on one line, `{"a": 1, "b": [2, 3]}`: no free whitespace, so a small model cannot loop on newlines and spaces
# (a schema's own "x-guidance" options win over this)
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


NEG_INF = float("-inf")
# bit j of a mask byte set -> token 8 * byte + j allowed (llguidance packs bits little-endian): its bias 0, else -inf
BYTE_BIAS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, np.float32(0), np.float32(NEG_INF))


class GrammarError(ValueError):
    """A schema, regex or grammar llguidance cannot compile; the message names the construct."""


class RowConstraint:
    """One row's position in a grammar: which tokens may come next, and whether the grammar is complete."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def logit_bias(self, stop_ids) -> torch.Tensor:
        """A float32 (vocab,) bias for the next token's logits: 0 where the grammar allows the token, -inf where it
        forbids it. Stop ids are allowed only where the grammar is complete (llguidance's EOS stands for them)."""
        # llguidance gives one bit per token; a 256 x 8 table turns each mask byte into its 8 biases at once, which
        # is the cheapest way found to expand 32 KiB of bits over Gemma's 262k-token vocabulary (bench/RESULTS.md)
        packed = np.frombuffer(self.matcher.compute_bitmask(), np.uint8)
        bias = torch.from_numpy(BYTE_BIAS[packed].reshape(-1)[:self.vocab])
        accepting = self.matcher.is_accepting()
        for token in stop_ids:
            if token < self.vocab:
                bias[token] = 0.0 if accepting else NEG_INF
        if self.matcher.is_error():  # cannot happen for a compiled grammar; end the row cleanly rather than hang
            bias.fill_(NEG_INF)
            for token in stop_ids:
                if token < self.vocab:
                    bias[token] = 0.0
        return bias

    def advance(self, token: int) -> bool:
        """Consume the sampled token; True when the grammar is complete and nothing more may follow (or, which a
        masked sampler never causes, the token broke the grammar: the row must end either way)."""
        return not self.matcher.consume_token(int(token)) or self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()


class Grammar:
    """A compiled grammar for one tokenizer; immutable and shared by every row that uses it."""

    def __init__(self, template, vocab: int, source: str, lock: threading.Lock):
        self.template, self.vocab, self.source, self._lock = template, vocab, source, lock

    def start(self) -> RowConstraint:
        """A fresh constraint at the grammar's start (a copy of the compiled matcher: nothing is recompiled)."""
        with self._lock:
            return RowConstraint(self.template.deep_copy(), self.vocab)

    def __repr__(self) -> str:
        return f"Grammar({self.source[:60]!r}...)" if len(self.source) > 60 else f"Grammar({self.source!r})"


class GrammarCompiler:
    """Compiles grammars for one tokenizer; `vocab` is the width of the model's logits (>= the tokenizer's)."""

    def __init__(self, tokenizer, vocab: int, cache_size: int = DEFAULT_CACHE):
        if llguidance is None:
            raise ImportError(INSTALL_HINT)
        backend = getattr(tokenizer, "backend", None)
        if backend is None or not hasattr(backend, "to_str"):
            raise TypeError("GrammarCompiler needs a gemma3n Tokenizer (a `tokenizers` backend)")
        self.vocab = max(int(vocab), tokenizer.vocab_size)
        # llguidance reads the vocabulary (and byte fallback) from the tokenizers JSON, the same one we decode with
        self.tokenizer = llguidance.LLTokenizer(backend.to_str(), n_vocab=self.vocab, eos_token=tokenizer.eos_id)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled (cache misses), for tests and metrics

    # -- the front doors -------------------------------------------------------------------------------------------

    def json_schema(self, schema: Any) -> Grammar:
        """JSON that validates against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError(f"a JSON schema must be an object (or true/false), got {type(schema).__name__}")
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
        except ValueError as e:
            raise GrammarError(f"unsupported JSON schema: {e}") from None
        return self.compile(source, "JSON schema")

    def json_object(self) -> Grammar:
        """Any JSON object (OpenAI's `"response_format": {"type": "json_object"}`)."""
        return self.json_schema({"type": "object"})

    def regex(self, pattern: str) -> Grammar:
        """Text matching the regular expression `pattern` in full (Rust regex syntax)."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("the regular expression must be a non-empty string")
        return self.compile(llguidance.LLMatcher.grammar_from_regex(pattern), "regular expression")

    def lark(self, grammar: str) -> Grammar:
        """Text of a Lark grammar (llguidance's dialect: `start: ...`, /regex/ terminals, `%json {schema}`)."""
        if not isinstance(grammar, str) or not grammar.strip():
            raise GrammarError("the grammar must be a non-empty string")
        return self.compile(llguidance.LLMatcher.grammar_from_lark(grammar), "grammar")

    # -- compilation -----------------------------------------------------------------------------------------------

    def compile(self, source: str, what: str = "grammar") -> Grammar:
        """llguidance's grammar text -> a Grammar, from the cache when the same text was compiled before."""
        with self._lock:
            hit = self._cache.get(source)
            if hit is not None:
                self._cache.move_to_end(source)
                return hit
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, self.tokenizer)
        if failed:
            raise GrammarError(f"unsupported {what}: {_first_line(messages[0])}")
        template = llguidance.LLMatcher(self.tokenizer, source, log_level=0)
        if template.is_error():
            raise GrammarError(f"unsupported {what}: {_first_line(template.get_error())}")
        grammar = Grammar(template, self.vocab, source, self._lock)
        with self._lock:
            self.compiled += 1
            self._cache[source] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar


def _first_line(message: str) -> str:
    """llguidance's messages can run to several lines (a caret under the source); the first says what is wrong,
    the rest is kept on one line so a JSON error body stays readable."""
    return " ".join(line.strip() for line in message.strip().splitlines() if line.strip())[:500]
