"""The ways a caller asks for structured output -> one compiled grammar.

OpenAI's `response_format` (`{"type": "json_object"}`, `{"type": "json_schema", "json_schema": {"schema": ...}}`)
and the extensions vLLM names `guided_json`, `guided_regex` and `guided_grammar` (here: llguidance's Lark dialect).
"""
from __future__ import annotations

from typing import Any

from .grammar import Grammar, GrammarCompiler, GrammarError


def response_format_grammar(compiler: GrammarCompiler, response_format: Any) -> Grammar | None:
    """OpenAI's `response_format` -> a grammar (None for `{"type": "text"}` or no format)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise GrammarError('response_format must be an object with a "type": "text", "json_object" or '
                           '"json_schema"')
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return compiler.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError('response_format "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        if "schema" not in spec:
            raise GrammarError('response_format.json_schema has no "schema"')
        return compiler.json_schema(spec["schema"])
    raise GrammarError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")


def constraint_for(compiler: GrammarCompiler, *, response_format: Any = None, json_schema: Any = None,
                   regex: str | None = None, grammar: str | None = None) -> Grammar | None:
    """The one grammar a request asks for (at most one of the four may be given), or None."""
    given = [name for name, value in (("response_format", _format_or_none(response_format)),
                                      ("json_schema", json_schema), ("regex", regex), ("grammar", grammar))
             if value is not None]
    if len(given) > 1:
        raise GrammarError(f"give one way to constrain the output, not {' and '.join(given)}")
    if json_schema is not None:
        return compiler.json_schema(json_schema)
    if regex is not None:
        return compiler.regex(regex)
    if grammar is not None:
        return compiler.lark(grammar)
    return response_format_grammar(compiler, response_format)


def _format_or_none(response_format: Any) -> Any:
    if isinstance(response_format, dict) and response_format.get("type") == "text":
        return None
    return response_format
