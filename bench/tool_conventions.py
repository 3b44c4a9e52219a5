"""Which tool-call convention does the real Gemma 3 270M follow best? (chooses the one gemma3n.structured.tools uses)

Gemma has no tool tokens, so the tools are described in the prompt and the model is asked to answer with a call in
some textual form. Three conventions, each rendered into the first user turn, greedy:
  json      <tool_call>{"name": ..., "arguments": {...}}</tool_call> (Hermes / Qwen style tags)
  pythonic  [get_weather(city="Paris")] (the format vLLM ships for Gemma 3: `--tool-call-parser pythonic`)
  tool_code ```tool_code\nget_weather(city="Paris")\n``` (Google's Gemma 3 function-calling guide)
Each is run under its own grammar (llguidance), as the server runs it:
  auto      a call or plain text, the model chooses: `chose_call` on prompts that need a tool, `chose_text` on
            prompts that need none;
  required  a call is forced: `name` (the right function) and `value` (the value the question mentions is in the
            arguments) on the prompts that need a tool.
`--unconstrained` also counts answers without any grammar that parse as a call (the 270M base model mostly
repeats the prompt, so this is near zero for every convention).

    PYTHONPATH=. python bench/tool_conventions.py
"""
from __future__ import annotations

import ast
import json
import re
import sys
import time

TOOLS = [
    {"name": "get_weather", "description": "Current weather in a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
                    "required": ["city"]}},
    {"name": "convert_currency", "description": "Convert an amount of money from one currency to another",
     "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "source": {"type": "string"},
                                                     "target": {"type": "string"}},
                    "required": ["amount", "source", "target"]}},
]
NEEDS = [("What is the weather in Paris?", "get_weather", "Paris"),
         ("Is it raining in Tokyo right now?", "get_weather", "Tokyo"),
         ("How warm is it in Berlin today, in celsius?", "get_weather", "Berlin"),
         ("Tell me the current weather for Madrid.", "get_weather", "Madrid"),
         ("Weather in London please", "get_weather", "London"),
         ("Convert 100 dollars to euros.", "convert_currency", "100"),
         ("How many yen is 50 euros?", "convert_currency", "50"),
         ("Change 20 pounds into dollars.", "convert_currency", "20")]
NO_TOOL = ["Write a haiku about the sea.", "What is 2 + 2?", "Say hello to my friend Anna.",
           "Name three colours."]


def describe(tools) -> str:
    return "\n".join(json.dumps(t) for t in tools)


def prompt_json(question: str) -> str:
    return (f"You have access to these functions:\n{describe(TOOLS)}\n\nTo call a function, answer with only\n"
            '<tool_call>\n{"name": "function name", "arguments": {"argument": "value"}}\n</tool_call>\n'
            f"Otherwise answer in plain text.\n\n{question}")


def prompt_pythonic(question: str) -> str:
    return ("You have access to functions. If you decide to invoke any of the function(s), you MUST put it in the "
            "format of\n[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
            "You SHOULD NOT include any other text in the response if you call a function\n"
            f"{describe(TOOLS)}\n\n{question}")


def prompt_tool_code(question: str) -> str:
    return ("At each turn, if you decide to invoke any of the function(s), it should be wrapped with "
            "```tool_code```. The python methods described below are imported and available, you can only use "
            f"defined methods.\n{describe(TOOLS)}\n\n{question}")


def parse_json(text: str):
    m = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", text, re.S)
    if not m:
        return None
    try:
        call = json.loads(m.group(1))
        return call.get("name"), json.dumps(call.get("arguments"))
    except (json.JSONDecodeError, AttributeError):
        return None


def _python_call(source: str):
    try:
        node = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        return None
    if isinstance(node, ast.List) and node.elts:
        node = node.elts[0]
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        return None
    try:
        args = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except ValueError:
        return None
    return node.func.id, json.dumps(args)


def parse_pythonic(text: str):
    m = re.search(r"\[.*\]", text, re.S)
    return _python_call(m.group(0)) if m else None


def parse_tool_code(text: str):
    m = re.search(r"```tool_code\s*(.*?)```", text, re.S)
    return _python_call(m.group(1)) if m else None


CONVENTIONS = {"json": (prompt_json, parse_json), "pythonic": (prompt_pythonic, parse_pythonic),
               "tool_code": (prompt_tool_code, parse_tool_code)}

# the pythonic calls of the two tools, as Lark (what a pythonic grammar generated from the schemas would be)
PY_CALLS = r"""
call: "get_weather(city=" STR (", unit=" UNIT)? ")" | "convert_currency(amount=" NUM ", source=" STR ", target=" STR ")"
STR: /"[^"\\\n]{1,40}"/
UNIT: "\"celsius\"" | "\"fahrenheit\""
NUM: /-?[0-9]{1,9}(\.[0-9]{1,6})?/
"""


def grammars(model, convention: str, auto: bool) -> object:
    if convention == "json":
        from gemma3n.structured.tools import ToolChoice, read_tools, tool_grammar
        functions = read_tools([{"type": "function", "function": t} for t in TOOLS])
        return tool_grammar(model.grammars, functions, ToolChoice("auto" if auto else "required"), parallel=False)
    if convention == "pythonic":
        start, text = 'start: "[" call "]"', r'TEXT: /(?s:.+)/ & ~/(?s:\[.*)/'
    else:
        start, text = 'start: "```tool_code\\n" call "\\n```"', r'TEXT: /(?s:.+)/ & ~/(?s:```.*)/'
    rules = [start + (" | TEXT" if auto else ""), PY_CALLS] + ([text] if auto else [])
    return model.grammars.lark("\n".join(rules))


def main() -> None:
    import argparse
    import gemma3n
    from gemma3n.cli import default_model_path
    parser = argparse.ArgumentParser()
    parser.add_argument("--unconstrained", action="store_true")
    args = parser.parse_args()
    model = gemma3n.load(default_model_path())
    results = {}
    started = time.process_time()
    chat = lambda render, q: [{"role": "user", "content": render(q)}]  # noqa: E731
    for name, (render, parse) in CONVENTIONS.items():
        auto, required = grammars(model, name, True), grammars(model, name, False)
        score = {"chose_call": 0, "chose_text": 0, "name": 0, "value": 0}
        for question, function, value in NEEDS:
            ans = model.complete(chat(render, question), max_new_tokens=40, temperature=0.0,
                                 constraint=auto).text
            score["chose_call"] += parse(ans) is not None
            forced = model.complete(chat(render, question), max_new_tokens=60, temperature=0.0,
                                    constraint=required).text
            call = parse(forced)
            print(name, repr(question), repr(ans[:80]), repr(forced[:120]), file=sys.stderr)
            if call:
                score["name"] += call[0] == function
                score["value"] += call[0] == function and value.lower() in call[1].lower()
        for question in NO_TOOL:
            ans = model.complete(chat(render, question), max_new_tokens=24, temperature=0.0,
                                 constraint=auto).text
            score["chose_text"] += parse(ans) is None
            print(name, repr(question), repr(ans[:80]), file=sys.stderr)
        if args.unconstrained:
            score["unconstrained_parsed"] = sum(
                parse(model.generate(chat(render, q), max_new_tokens=48, temperature=0.0)) is not None
                for q, _, _ in NEEDS)
        results[name] = score
        print(name, score, file=sys.stderr)
    print(json.dumps({"needs_tool": len(NEEDS), "no_tool": len(NO_TOOL), "results": results,
                      "cpu_s": round(time.process_time() - started, 1)}))


if __name__ == "__main__":
    main()
