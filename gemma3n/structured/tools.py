"""Tool (function) calling for a model without tool tokens: the prompt convention, the grammar of a call, and the
parse of the answer into OpenAI `tool_calls`.

The convention (chosen by measurement on the real Gemma 3 270M, bench/tool_conventions.py and README):

- the tools are described in the system part of the prompt, one JSON object per line, followed by how to call them;
- a call is a JSON object in tags, on its own lines:

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  several calls (parallel_tool_calls) are several such blocks, one after another;
- an assistant turn that called tools is rendered back the same way, and each `tool` message becomes a
  `<tool_response>` block in a user turn (consecutive ones share a turn), so histories round-trip.

The grammar (llguidance Lark) constrains the call's arguments to the function's JSON schema: with `tool_choice`
"required" or a named function the answer must be call blocks; with "auto" it is either call blocks or plain text
that never contains `<tool_call>` (the model chooses at its first tokens); "none" leaves the tools out of the
prompt and the output unconstrained.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from .grammar import JSON_LAYOUT, Grammar, GrammarCompiler, GrammarError

OPEN, CLOSE = "<tool_call>", "</tool_call>"
RESPONSE_OPEN, RESPONSE_CLOSE = "<tool_response>", "</tool_response>"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*" + re.escape(CLOSE), re.S)


class ToolError(GrammarError):
    """A malformed `tools`, `tool_choice` or tool message; `param` names the field."""

    def __init__(self, message: str, param: str = "tools"):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto" | "none" | "required" | "named"
    name: str | None = None  # the function, when mode is "named"


def read_tools(tools: Any) -> list[Function]:
    """OpenAI's `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]) -> Functions."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("tools must be a list of {\"type\": \"function\", \"function\": {...}} objects")
    functions, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise ToolError(f'{where} must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}',
                            where)
        spec = tool["function"]
        name = spec.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, _ or -, got {name!r}", where)
        if name in seen:
            raise ToolError(f"{where}: the function name {name!r} is given twice", where)
        seen.add(name)
        description = spec.get("description") or ""
        parameters = spec.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(description, str):
            raise ToolError(f"{where}.function.description must be a string", where)
        if not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters must be a JSON schema object", where)
        functions.append(Function(name, description, parameters))
    return functions


def read_tool_choice(choice: Any, functions: list[Function]) -> ToolChoice:
    """OpenAI's `tool_choice`: "auto" (the default with tools), "none" (the default without), "required", or
    {"type": "function", "function": {"name": ...}}."""
    if choice is None:
        return ToolChoice("auto" if functions else "none")
    if choice in ("auto", "none", "required"):
        if choice != "none" and not functions:
            raise ToolError(f'tool_choice "{choice}" needs tools', "tool_choice")
        return ToolChoice(choice)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": '
                        '{"name": ...}}', "tool_choice")
    if name not in {f.name for f in functions}:
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools", "tool_choice")
    return ToolChoice("named", name)


# -- the prompt ----------------------------------------------------------------------------------------------------


def tools_instructions(functions: list[Function], parallel: bool = True) -> str:
    """What the model reads about the tools (the system part of the prompt)."""
    lines = [json.dumps({"name": f.name, "description": f.description, "parameters": f.parameters},
                        ensure_ascii=False) for f in functions]
    text = ["You have access to these functions:", *lines, "", "To call a function, answer with only", OPEN,
            '{"name": "function name", "arguments": {"argument": "value"}}', CLOSE]
    if parallel:
        text.append("Write one block per call to make several calls.")
    return "\n".join([*text, "Otherwise answer in plain text."])


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it (arguments: a dict, or OpenAI's JSON string of one)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise ToolError(f"the arguments of the earlier call to {name!r} are not valid JSON", "messages")
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False, separators=(", ", ": "))
    return f"{OPEN}\n{body}\n{CLOSE}"


def render_messages(messages: list[dict], functions: list[Function], choice: ToolChoice,
                    parallel: bool = True) -> list[dict]:
    """HF-format messages that may hold tool calls and tool results -> plain system / user / assistant turns in
    the convention above, with the tools described in the system part (unless tool_choice is "none")."""
    names: dict[str, str] = {}  # tool_call_id -> function name, to label the results
    out: list[dict] = []
    for i, message in enumerate(messages):
        role, content = message["role"], message.get("content")
        if role == "assistant" and message.get("tool_calls"):
            blocks = []
            for j, call in enumerate(message["tool_calls"]):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise ToolError(f"messages[{i}].tool_calls[{j}] needs function.name", "messages")
                names[call.get("id", "")] = function["name"]
                blocks.append(call_block(function["name"], function.get("arguments") or "{}"))
            text = _text(content, i)
            content = (text + "\n" if text else "") + "\n".join(blocks)
            role = "assistant"
        elif role == "tool":
            name = message.get("name") or names.get(message.get("tool_call_id", ""), "")
            result = {"name": name, "content": _text(content, i)} if name else {"content": _text(content, i)}
            content = f"{RESPONSE_OPEN}\n{json.dumps(result, ensure_ascii=False)}\n{RESPONSE_CLOSE}"
            role = "user"
        if out and role == out[-1]["role"] == "user" and isinstance(content, str) \
                and isinstance(out[-1]["content"], str):
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + content}  # results share a turn
        else:
            out.append({"role": role, "content": content if content is not None else ""})
    if functions and choice.mode != "none":
        out = _with_system(out, tools_instructions(functions, parallel))
    return out


def _text(content: Any, i: int) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p["text"] for p in content)
    raise ToolError(f"messages[{i}]: tool calls and tool results take text content only", "messages")


def _with_system(messages: list[dict], instructions: str) -> list[dict]:
    if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
        system = messages[0]["content"].strip()
        return [{"role": "system", "content": f"{system}\n\n{instructions}" if system else instructions},
                *messages[1:]]
    return [{"role": "system", "content": instructions}, *messages]


# -- the grammar ---------------------------------------------------------------------------------------------------


def call_schema(functions: list[Function]) -> dict:
    """The JSON schema of one call's object: {"name": one function, "arguments": its parameters}."""
    options = [{"type": "object", "properties": {"name": {"const": f.name}, "arguments": f.parameters},
                "required": ["name", "arguments"], "additionalProperties": False} for f in functions]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_LAYOUT}


def tool_grammar(compiler: GrammarCompiler, functions: list[Function], choice: ToolChoice,
                 parallel: bool = True) -> Grammar | None:
    """The grammar of the answer for this tool_choice; None for "none" (and for no tools)."""
    if choice.mode == "none" or not functions:
        return None
    allowed = [f for f in functions if choice.mode != "named" or f.name == choice.name]
    calls = "call (\"\\n\" call)*" if parallel else "call"
    rules = [f"calls: {calls}",
             f'call: "{OPEN}\\n" body "\\n{CLOSE}"',
             f"body: %json {json.dumps(call_schema(allowed))}"]
    if choice.mode == "auto":
        # plain text that never holds the call tag: the model decides at its first tokens, and every call in an
        # answer is one the grammar checked
        rules = ["start: calls | TEXT", *rules, f"TEXT: /(?s:.+)/ & ~/(?s:.*{re.escape(OPEN)}.*)/"]
    else:
        rules = ["start: calls", *rules]
    try:
        return compiler.lark("\n".join(rules))
    except GrammarError as e:
        raise ToolError(f"a function's parameters are not a supported JSON schema: {e}", "tools") from None


# -- the answer ----------------------------------------------------------------------------------------------------


def parse_calls(text: str) -> tuple[str | None, list[dict]]:
    """The model's whole answer -> (content, tool_calls in OpenAI's shape); what `CallStream` gives piece by piece.
    An answer with no complete call block is all content; text around the blocks is kept as content."""
    stream = CallStream()
    stream.push(text)
    stream.finish()
    if not stream.calls:
        return text, []
    return stream.content.strip() or None, stream.calls


def _read_call(body: str) -> dict | None:
    try:
        call = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    arguments = call.get("arguments", {})
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


class CallStream:
    """Streaming parse: `push` text pieces, get ("text", piece) and ("call", tool_call) events as soon as they are
    settled. Text that might still become a call block (a prefix of the tag, or an open block) is held back."""

    def __init__(self):
        self.buffer = ""  # text not yet settled
        self.calls: list[dict] = []
        self.content = ""  # text released as content

    def push(self, piece: str) -> list[tuple[str, Any]]:
        self.buffer += piece
        return self._settle(final=False)

    def finish(self) -> list[tuple[str, Any]]:
        return self._settle(final=True)

    def _settle(self, final: bool) -> list[tuple[str, Any]]:
        events = []
        while self.buffer:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if final else _tag_prefix(self.buffer)
                text, self.buffer = self.buffer[:len(self.buffer) - keep], self.buffer[len(self.buffer) - keep:]
                if text:
                    events.append(self._text(text))
                break
            if start > 0:
                events.append(self._text(self.buffer[:start]))
                self.buffer = self.buffer[start:]
            end = self.buffer.find(CLOSE)
            if end < 0:
                if final:  # an unfinished block (cut by max_tokens): it is text
                    events.append(self._text(self.buffer))
                    self.buffer = ""
                break
            call = _read_call(self.buffer[len(OPEN):end].strip())
            block, self.buffer = self.buffer[:end + len(CLOSE)], self.buffer[end + len(CLOSE):]
            if call is None:
                events.append(self._text(block))
            else:
                self.calls.append(call)
                events.append(("call", call))
        return [e for e in events if e[0] == "call" or e[1]]

    def _text(self, text: str) -> tuple[str, str]:
        if self.calls and not text.strip():
            return ("text", "")  # the newlines between blocks
        self.content += text
        return ("text", text)


def _tag_prefix(text: str) -> int:
    """Length of the longest end of `text` that begins the call tag."""
    for k in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if text.endswith(OPEN[:k]):
            return k
    return 0
