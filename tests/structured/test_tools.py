"""The tool-call convention without a model: reading OpenAI's tools, rendering histories, parsing answers (whole
and streamed piece by piece)."""
from __future__ import annotations

import json

import pytest

from gemma3n.structured.tools import (CallStream, ToolChoice, ToolError, parse_calls, read_tool_choice, read_tools,
                                      render_messages)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}},
         {"type": "function", "function": {"name": "now"}}]
ANSWER = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')


def test_read_tools_and_choice():
    functions = read_tools(TOOLS)
    assert [f.name for f in functions] == ["get_weather", "now"]
    assert functions[1].parameters == {"type": "object", "properties": {}}
    assert read_tool_choice(None, functions) == ToolChoice("auto")
    assert read_tool_choice(None, []) == ToolChoice("none")
    assert read_tool_choice({"type": "function", "function": {"name": "now"}}, functions) == ToolChoice("named", "now")


@pytest.mark.parametrize("tools, words", [
    ("get_weather", "must be a list"),
    ([{"type": "function", "function": {"name": "has space"}}], "letters, digits"),
    ([TOOLS[1], TOOLS[1]], "given twice"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema object"),
    ([{"type": "retrieval"}], '"type": "function"'),
])
def test_bad_tools_are_refused_with_the_reason(tools, words):
    with pytest.raises(ToolError, match=words):
        read_tools(tools)


def test_parse_calls_gives_openai_tool_calls_and_the_rest_as_content():
    content, calls = parse_calls(ANSWER)
    assert content == "Let me check."
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("function", "get_weather", {"city": "Paris"}), ("function", "now", {})]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert parse_calls("plain answer") == ("plain answer", [])
    assert parse_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])
    cut = '<tool_call>\n{"name": "now", "argu'  # cut by max_tokens: stays text
    assert parse_calls(cut) == (cut, [])


@pytest.mark.parametrize("size", [1, 3, 7, len(ANSWER)])
def test_the_stream_gives_the_same_calls_and_never_leaks_a_tag(size):
    stream, events = CallStream(), []
    for i in range(0, len(ANSWER), size):
        events += stream.push(ANSWER[i:i + size])
    events += stream.finish()
    text = "".join(v for kind, v in events if kind == "text")
    assert "<tool" not in text and text.strip() == "Let me check."
    calls = [v for kind, v in events if kind == "call"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "now"]
    plain = CallStream()
    assert plain.push("a <tool") == [("text", "a ")]  # held back: it may begin a call
    assert plain.finish() == [("text", "<tool")]


def test_history_renders_calls_and_results_as_alternating_turns():
    functions = read_tools(TOOLS)
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Weather in Paris, and the time?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": '{"city": "Paris"}'}},
                   {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
               {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]}]
    out = render_messages(history, functions, ToolChoice("auto"))
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\nYou have access to these functions:\n")
    assert json.dumps({"name": "now", "description": "", "parameters": {"type": "object", "properties": {}}}) \
        in out[0]["content"]
    assert parse_calls(out[2]["content"])[1][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert out[3]["content"] == ('<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>'
                                 '\n\n<tool_response>\n{"name": "now", "content": "noon"}\n</tool_response>')
    assert "functions" not in render_messages(history, functions, ToolChoice("none"))[0]["content"]
    with pytest.raises(ToolError, match="not valid JSON"):
        render_messages([{"role": "assistant", "tool_calls": [{"id": "x", "function": {
            "name": "now", "arguments": "{oops"}}]}], functions, ToolChoice("auto"))
