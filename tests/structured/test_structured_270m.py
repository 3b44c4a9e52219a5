"""The proofs on the real Gemma 3 270M, through `gemma3n serve` started as the console script: twenty varied JSON
schemas give answers that parse and validate (`jsonschema`), streaming and not, while unconstrained requests in
the same batch give their solo answers; the official openai client gets well-formed tool calls for a request with
two tools, and a full round trip (call -> tool message -> answer) works; bad schemas are 400s."""
from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import threading
from pathlib import Path

import pytest

jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests validate with jsonschema")
openai = pytest.importorskip("openai", reason="the server tests need the openai client (test extra)")
pytest.importorskip("llguidance", reason="structured output needs the 'structured' extra (llguidance)")
pytest.importorskip("fastapi", reason="the server tests need the 'serve' extra")

from ..server.test_console_serve import ServeProcess  # noqa: E402
from .schemas import CASES  # noqa: E402

pytestmark = pytest.mark.slow

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "maxLength": 40},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                                          "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "convert_currency", "description": "Convert an amount of money",
                                      "parameters": {"type": "object", "properties": {
                                          "amount": {"type": "number", "minimum": 0, "maximum": 1000000,
                                                     "multipleOf": 0.01},
                                          "source": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                          "target": {"type": "string", "pattern": "^[A-Z]{3}$"}},
                                          "required": ["amount", "source", "target"],
                                          "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PLAIN = ["Write one sentence about the sea.", "What is the capital of France?", "Name a famous painter."]


@pytest.fixture(scope="module")
def served():
    from gemma3n.cli import default_model_path
    running = ServeProcess("--model", str(default_model_path()), "--served-model-name", "gemma",
                           "--max-batch", "64", "--max-prompt-tokens", "1500")
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=1200)


def _messages(question: str) -> list[dict]:
    return [{"role": "user", "content": question + " Answer in JSON."}]


def _ask(client, question: str, schema: dict, stream: bool) -> tuple[str, str]:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    kwargs = dict(model="gemma", messages=_messages(question), max_tokens=200, temperature=0,
                  response_format=fmt)
    if not stream:
        choice = client.chat.completions.create(**kwargs).choices[0]
        return choice.message.content, choice.finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_twenty_schemas_validate_streaming_and_not_beside_unconstrained_requests(client):
    solo = [client.chat.completions.create(model="gemma", messages=[{"role": "user", "content": q}],
                                           max_tokens=24, temperature=0).choices[0].message.content
            for q in PLAIN]
    answers: dict = {}

    def run(key, call):
        answers[key] = call()

    jobs = [((i, stream), lambda q=q, s=s, st=stream: _ask(client, q, s, st))
            for i, (q, s) in enumerate(CASES) for stream in (False, True)]
    jobs += [(("plain", i), lambda q=q: client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": q}], max_tokens=24,
        temperature=0).choices[0].message.content) for i, q in enumerate(PLAIN)]
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(CASES) == 20
    failures = []
    for i, (question, schema) in enumerate(CASES):
        for stream in (False, True):
            text, finish = answers[(i, stream)]
            try:
                jsonschema.validate(json.loads(text), schema)
            except (json.JSONDecodeError, jsonschema.ValidationError) as e:
                failures.append((i, stream, text[:200], finish, str(e)[:200]))
            else:
                assert finish == "stop"
    assert not failures, failures
    # greedy: a streamed answer is the same as the whole one, and the plain requests equal their solo answers
    assert all(answers[(i, False)][0] == answers[(i, True)][0] for i in range(len(CASES)))
    assert [answers[("plain", i)] for i in range(len(PLAIN))] == solo


def _check_calls(calls, names=None):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or SCHEMA_OF)
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def test_two_tools_and_a_round_trip_with_the_openai_client(client):
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls)
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] == "Paris"
    # streamed: the same calls arrive as tool_calls deltas
    streamed: dict = {}
    for chunk in client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS,
                                                tool_choice="required", parallel_tool_calls=False,
                                                max_tokens=120, temperature=0, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or []:
            entry = streamed.setdefault(delta.index, {"name": "", "arguments": ""})
            entry["name"] += delta.function.name or ""
            entry["arguments"] += delta.function.arguments or ""
    assert [(e["name"], json.loads(e["arguments"])) for e in streamed.values()] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    # parallel calls (the default): the 270M goes on calling until max_tokens, every complete call well-formed
    several = client.chat.completions.create(model="gemma", messages=messages, tools=TOOLS, tool_choice="required",
                                             max_tokens=120, temperature=0).choices[0]
    assert len(several.message.tool_calls) >= 2 and several.finish_reason in ("tool_calls", "length")
    _check_calls(several.message.tool_calls)
    # a named function
    named = client.chat.completions.create(
        model="gemma", messages=[{"role": "user", "content": "Convert 100 dollars to euros."}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "convert_currency"}}, max_tokens=120,
        temperature=0)
    _check_calls(named.choices[0].message.tool_calls, {"convert_currency"})
    # the round trip: the call and its result go back in the history, the model answers in text
    history = messages + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius and sunny"}]
    answer = client.chat.completions.create(model="gemma", messages=history, tools=TOOLS, tool_choice="none",
                                            max_tokens=40, temperature=0)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
    auto = client.chat.completions.create(model="gemma", messages=history, tools=TOOLS, max_tokens=40,
                                          temperature=0)
    assert auto.choices[0].message.content or auto.choices[0].message.tool_calls


def test_bad_schemas_are_400s(client):
    for schema, construct in (({"type": "object", "patternProperties": {}, "if": {}}, "if"),
                              ({"type": "string", "format": "colour"}, "colour")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="gemma", messages=_messages("x"), max_tokens=8,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "x", "schema": schema}})
        assert construct in str(e.value)


def _readme_blocks(kind: str) -> list[str]:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Structured output and tool calls", 1)[1].split("\n## ", 1)[0]
    return [body for lang, body in re.findall(r"```(\w*)\n(.*?)```", section, re.S) if lang == kind]


def test_the_readme_curl_commands(served):
    """The README's `gemma3n serve --served-model-name gemma` (this module's server) and its curl commands."""
    block = next(b for b in _readme_blocks("bash") if "curl" in b)
    assert "gemma3n serve --served-model-name gemma" in block
    commands = ["curl" + c for c in block.split("\ncurl")[1:]]
    assert len(commands) == 3
    replies = []
    for command in commands:
        done = subprocess.run(["bash", "-c", command.replace("http://127.0.0.1:8000", served.url)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        replies.append(json.loads(done.stdout))
    place = json.loads(replies[0]["choices"][0]["message"]["content"])
    assert set(place) == {"city", "country"} and re.fullmatch("[A-Z]{2}", place["country"])
    assert re.fullmatch(" [a-h][1-8]-[a-h][1-8]", replies[1]["choices"][0]["text"])
    assert re.fullmatch("(yes|no), because [a-z ]{1,40}\\.", replies[2]["choices"][0]["message"]["content"])


def test_the_readme_tool_call_example(served):
    code = next(b for b in _readme_blocks("python") if "tool_choice" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code.replace("http://127.0.0.1:8000", served.url), {})
    first, answer = out.getvalue().split("\n", 1)
    assert first.startswith("tool_calls get_weather {'city': 'Paris'") and answer.strip()


def test_the_readme_python_example():
    code = next(b for b in _readme_blocks("python") if "json_schema=schema" in b)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    person, yes_no, colour = out.getvalue().splitlines()[:3]
    assert set(json.loads(person)) == {"name", "age"} and yes_no in ("yes", "no")
    text, finish = colour.rsplit(" ", 1)
    assert finish == "stop" and json.loads(text) in ("red", "yellow", "blue")
