"""Chat messages -> prompt text: the checkpoint's Jinja chat template, rendered as transformers renders it, and the
Gemma 3n expansion of image / audio placeholders into their soft-token runs.
"""

from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping

import jinja2
import numpy as np
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Written from the documented Gemma 3n behaviour (architecture.md 6.1); renders identically to the template the
# official IT checkpoints ship: BOS; a leading system message becomes a prefix of the first turn; user/assistant must
# alternate starting with user; assistant is spelled "model"; text is trimmed; image / audio parts become one
# placeholder token each, expanded later by `expand_placeholders`.
GEMMA3N_CHAT_TEMPLATE = r"""{%- macro render_content(content) -%}
{%- if content is string -%}
{{- content | trim -}}
{%- elif content is iterable -%}
{%- for part in content -%}
{%- if part['type'] == 'audio' -%}<audio_soft_token>
{%- elif part['type'] == 'image' -%}<image_soft_token>
{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}
{%- endif -%}
{%- endfor -%}
{%- else -%}
{{- raise_exception('Invalid content type') -}}
{%- endif -%}
{%- endmacro -%}
{{- bos_token -}}
{%- set system_prefix = '' -%}
{%- set turns = messages -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system = messages[0]['content'] -%}
{%- set system_prefix = (system if system is string else system[0]['text']) + '\n\n' -%}
{%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
{%- if (message['role'] == 'user') != (loop.index0 is even) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
<start_of_turn>{{ role }}
{{ system_prefix if loop.first else '' }}{{ render_content(message['content']) }}<end_of_turn>
{{ '' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
<start_of_turn>model
{{ '' }}
{%- endif -%}
"""

ROLES = ("system", "user", "assistant", "tool")
PART_TYPES = ("text", "image", "audio", "video")

IMAGE_TOKEN, BOI_TOKEN, EOI_TOKEN = "<image_soft_token>", "<start_of_image>", "<end_of_image>"
AUDIO_TOKEN, BOA_TOKEN, EOA_TOKEN = "<audio_soft_token>", "<start_of_audio>", "<end_of_audio>"

# transformers copies reasoning under these names so templates find it whichever one they read
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def validate_messages(messages: Any) -> None:
    """Raise a clear error unless `messages` is a non-empty list of HF-format chat messages."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; give at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"message {i} is a {type(message).__name__}, expected a dict with 'role' and 'content'")
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        if message.get("content") is None and message.get("tool_calls") is not None:
            continue  # an assistant turn that only calls tools
        _validate_content(i, message.get("content"))


def _validate_content(i: int, content: Any) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"message {i} content must be a string or a list of parts, got {type(content).__name__}")
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in PART_TYPES:
            raise ValueError(
                f"message {i} part {j} must be a dict with 'type' in {', '.join(PART_TYPES)}, got {part!r:.80}"
            )
        if kind == "text" and not isinstance(part.get("text"), str):
            raise TypeError(f"message {i} part {j} is a text part without a string 'text'")


def render_chat(
    messages: list[dict],
    template: str | None = None,
    add_generation_prompt: bool = True,
    bos_token: str = "<bos>",
    eos_token: str = "<eos>",
    **extra: Any,
) -> str:
    """Render `messages` with `template` (Gemma 3n's built-in one if None), as transformers'
    `apply_chat_template(..., tokenize=False)` does; extra keyword arguments reach the template as variables."""
    validate_messages(messages)
    # transformers drops None-valued keys (OpenAI clients send content=None) and gives the template plain data only
    chat = [_alias_reasoning({k: _plain(v) for k, v in m.items() if v is not None}) for m in messages]
    variables = {"tools": None, "documents": None, **{k: _plain(v) for k, v in extra.items()}}
    try:
        return _compile(template or GEMMA3N_CHAT_TEMPLATE).render(
            messages=chat, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token,
            **variables,
        )
    except jinja2.TemplateError as exc:
        raise ValueError(f"chat template rejected the messages: {exc}") from None


def expand_placeholders(
    text: str,
    image_tokens: int = 256,
    audio_tokens: int = 188,
    *,
    num_images: int | None = None,
    num_audios: int | None = None,
    image_token: str = IMAGE_TOKEN,
    audio_token: str = AUDIO_TOKEN,
) -> str:
    """Replace each image / audio placeholder by its soft-token run, as Gemma3nProcessor does:
    "\\n\\n<start_of_image>" + 256 x image token + "<end_of_image>\\n\\n" (audio: boa / 188 / eoa).

    num_images / num_audios, when given, must equal the number of placeholders found (one per input)."""
    for kind, token, expected in (("image", image_token, num_images), ("audio", audio_token, num_audios)):
        found = text.count(token)
        if expected is not None and found != expected:
            raise ValueError(f"the prompt has {found} {token} placeholders but {expected} {kind} inputs were given")
    runs = {
        image_token: f"\n\n{BOI_TOKEN}{image_token * image_tokens}{EOI_TOKEN}\n\n",
        audio_token: f"\n\n{BOA_TOKEN}{audio_token * audio_tokens}{EOA_TOKEN}\n\n",
    }
    # one left-to-right pass, so the tokens inserted by a replacement are never expanded again
    pattern = "|".join(re.escape(t) for t in runs)
    return re.sub(pattern, lambda m: runs[m.group(0)], text)


# ---- Jinja environment (mirrors transformers' chat_template_utils) ---------------------------------------------


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body; transformers uses it only to mark assistant spans."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's namespace() that refuses underscore names, so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # same signature trick as jinja's Namespace: `self` may be a kwarg
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _DictBuilder:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes <, >, & and ', which would change the prompt
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per template string; chat templates come from checkpoints, so they run sandboxed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_DictBuilder(), namespace=_Namespace
    )
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"chat template is not valid Jinja (line {exc.lineno}: {exc.message})") from None


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _plain(value: Any) -> Any:
    """JSON-like copy of `value`; other objects (images, arrays) become inert "<TypeName>" strings.

    The sandbox does not know which methods of arbitrary objects are dangerous, and templates only test whether a
    media key is present, so this never changes what a template renders. Same rules, same order as transformers."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    for base in (str, int, float):  # subclasses (enums) lose their extra methods
        if isinstance(value, base):
            return base(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):  # np.bool_(False) must stay falsy
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic models
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
