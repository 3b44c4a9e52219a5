"""Structured output: grammars that constrain generation (JSON schemas, regular expressions, Lark grammars) and the
tool-calling convention built on them.

- `grammar`: llguidance compiled against the model's own tokenizer, an LRU cache of compiled grammars, and the
  per-row state the engine applies as a token mask (engine/batch.py);
- `formats`: OpenAI's `response_format` and the `guided_*` extension fields -> a grammar;
- `tools`: OpenAI `tools` / `tool_choice` -> the prompt that describes them, the grammar of a call, and the parse of
  the model's output back into `tool_calls`.
"""
from .formats import constraint_for, response_format_grammar
from .grammar import Grammar, GrammarCompiler, GrammarError, RowConstraint

__all__ = ["Grammar", "GrammarCompiler", "GrammarError", "RowConstraint", "constraint_for",
           "response_format_grammar"]
