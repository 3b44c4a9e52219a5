"""Structured output and tool calls through the server, on the tiny random checkpoint: whatever a random model
would say, the grammar makes the answer valid (checked with `jsonschema`), unconstrained requests running beside
constrained ones are untouched, and bad schemas are 400s that name the construct. (The real 270M proofs, through
`gemma3n serve` and the openai client, are in test_structured_270m.py.)"""
from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests validate with jsonschema")
pytest.importorskip("llguidance", reason="structured output needs the 'structured' extra (llguidance)")

# every string, array and number is bounded, so even a random model completes the JSON within max_tokens
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                     "maximum": 99}},
     "required": ["ok", "n"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                               "maxItems": 2}},
     "required": ["color", "tags"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
     "required": ["code"], "additionalProperties": False},
]
MESSAGES = [{"role": "user", "content": "Describe something as JSON."}]
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two small numbers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def roomy(model):
    """A server whose prompt limit fits the tool descriptions (one token per byte with the tiny tokenizer)."""
    from gemma3n.server import ServerSettings
    from .conftest import LIMITS, RunningServer
    running = RunningServer(model, ServerSettings(model_name="tiny", **{**LIMITS, "max_prompt_tokens": 1500,
                                                                                 "max_tokens": 200}))
    yield running
    running.close()


@pytest.fixture(scope="module")
def tool_client(roomy):
    import openai
    return openai.OpenAI(base_url=roomy.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                                 "max_tokens": 64, **body}, timeout=120)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "enum-array", "array", "pattern"])
def test_json_schema_answers_validate(server, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    reply = _chat(server, response_format=fmt, temperature=1.0, seed=3).json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"  # the grammar completed: the row ended at once
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_json_object_and_streaming(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64, stream=True,
                                                 seed=1, temperature=1.0,
                                                 response_format={"type": "json_schema", "json_schema": {
                                                     "name": "x", "schema": SCHEMAS[1]}}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[1])
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=64, temperature=0,
                                           response_format={"type": "json_object"})
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # a random model may fill an object's free strings until max_tokens
        assert reply.choices[0].message.content.startswith("{")


def test_completions_take_response_format_and_regex(server):
    body = {"model": "tiny", "prompt": "The answer:", "max_tokens": 40, "temperature": 1.0, "seed": 7}
    reply = httpx.post(server.url + "/v1/completions", json={**body, "guided_regex": r"(yes|no) [0-9]{2}"},
                       timeout=60).json()
    assert re.fullmatch(r"(yes|no) [0-9]{2}", reply["choices"][0]["text"])
    reply = httpx.post(server.url + "/v1/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[0]}}}, timeout=60).json()
    jsonschema.validate(json.loads(reply["choices"][0]["text"]), SCHEMAS[0])
    lark = 'start: "x=" NUM ";"\nNUM: /[0-9]{1,3}/'
    reply = httpx.post(server.url + "/v1/completions", json={**body, "guided_grammar": lark}, timeout=60).json()
    assert re.fullmatch(r"x=[0-9]{1,3};", reply["choices"][0]["text"])


def test_unconstrained_rows_beside_constrained_ones_equal_their_solo_answer(server, alone):
    """Greedy rows without a grammar, decoded in the same batch as rows with one, give their solo answer."""
    plain = [[{"role": "user", "content": f"tell me about {w}"}] for w in ("cats", "rain", "maps")]
    solo = [alone(m, max_new_tokens=24, temperature=0).text for m in plain]
    results: dict = {}
    barrier = threading.Barrier(6)

    def ask(key, body):
        barrier.wait()
        results[key] = _chat(server, **body).json()

    jobs = [(("plain", i), {"messages": m, "max_tokens": 24, "temperature": 0}) for i, m in enumerate(plain)]
    jobs += [(("json", i), {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": s}},
                            "temperature": 1.0, "seed": i}) for i, s in enumerate(SCHEMAS[:3])]
    threads = [threading.Thread(target=ask, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[("plain", i)]["choices"][0]["message"]["content"] for i in range(3)] == solo
    for i, schema in enumerate(SCHEMAS[:3]):
        jsonschema.validate(json.loads(results[("json", i)]["choices"][0]["message"]["content"]), schema)
    assert server.scheduler.peak_batch >= 2


@pytest.mark.parametrize("schema, construct", [
    ({"type": "object", "properties": {"a": {"type": "string"}}, "if": {"required": ["a"]}}, "if"),
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed group"),
    ({"type": "wrong"}, "wrong"),
])
def test_unsupported_schemas_are_400s_naming_the_construct(server, schema, construct):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    reply = _chat(server, response_format=fmt)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert construct in error["message"] and error["param"] == "response_format"
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # and the server serves on


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "xml"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"guided_regex": "(a"}, "guided_regex", "unclosed group"),
    ({"guided_grammar": "start: nothing_defined"}, "guided_grammar", "nothing_defined"),
    ({"guided_regex": "a", "guided_json": {"type": "object"}}, "guided_json", "not json_schema and regex"),
    ({"tools": [{"type": "function"}]}, "tools[0]", "tools[0]"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
])
def test_bad_structured_requests_are_400s(server, body, param, words):
    reply = _chat(server, **body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and words in error["message"], error


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_tool_calls_required_named_and_streamed(tool_client):
    client = tool_client
    reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, tools=TOOLS,
                                           tool_choice="required", parallel_tool_calls=False, seed=2,
                                           temperature=1.0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check_calls(choice.message.tool_calls)
    named = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, tools=TOOLS, seed=4,
                                           tool_choice={"type": "function", "function": {"name": "add"}},
                                           temperature=1.0)
    _check_calls(named.choices[0].message.tool_calls, {"add"})
    deltas, finish = {}, None
    for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False, seed=2,
                                                temperature=1.0, stream=True):
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = deltas.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [(d["name"], json.loads(d["arguments"])) for d in deltas.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]


def test_tool_choice_none_and_auto_answer_text_or_calls(tool_client):
    client = tool_client
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, tools=TOOLS,
                                          tool_choice="none", temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")
    for seed in range(3):
        auto = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, tools=TOOLS,
                                              seed=seed, temperature=1.0)
        message = auto.choices[0].message
        if message.tool_calls:
            _check_calls(message.tool_calls)
            assert auto.choices[0].finish_reason == "tool_calls"
        else:
            assert "<tool_call>" not in message.content


def test_history_with_tool_calls_and_results_is_rendered(roomy):
    server = roomy
    history = [{"role": "user", "content": "Weather in Oslo?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "-3 and snowing"}]
    reply = _chat(server, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=8)
    assert reply.status_code == 200, reply.text
    tokens = httpx.post(server.url + "/tokenize", json={"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", '
                                         '"unit": "celsius"}}\n</tool_call>'},
        {"role": "user", "content": '<tool_response>\n{"name": "get_weather", "content": "-3 and snowing"}\n'
                                    '</tool_response>'}]}, timeout=30).json()
    assert reply.json()["usage"]["prompt_tokens"] == tokens["count"]  # tool_choice none: no tool descriptions
    same = httpx.post(server.url + "/tokenize", json={"messages": history}, timeout=30).json()
    assert same["tokens"] == tokens["tokens"]  # /tokenize renders tool calls and results as the chat endpoint does
