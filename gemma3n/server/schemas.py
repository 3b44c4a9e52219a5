"""The request bodies the server accepts, validated strictly (a string is not a number), with readable errors."""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import bad_request


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Strict):
    data: str
    format: Literal["wav", "mp3"]


class AudioPart(_Strict):
    type: Literal["input_audio"]
    input_audio: InputAudio


Part = Annotated[Union[TextPart, ImagePart, AudioPart], Field(discriminator="type")]


class FunctionCall(_Strict):
    name: str
    arguments: str  # a JSON text, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Part] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool result: the call it answers
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields shared by chat and text completions; top_k / min_p / repetition_penalty are extensions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2 ** 63)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] | None = None  # choices; each its own sequence of the batch
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    # structured output: OpenAI's response_format, or (extensions, as vLLM names them) a JSON schema, a regular
    # expression or a Lark grammar (llguidance's dialect); checked when compiled (gemma3n.structured)
    response_format: Any = None
    guided_json: Any = None
    guided_regex: str | None = None
    guided_grammar: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", param="stop")
        return tuple(stops)


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    tools: Any = None  # checked by gemma3n.structured.tools.read_tools, whose errors name the tool
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Any  # a string, a one-string list, or token ids: checked by `one_prompt` with errors that say which

    @field_validator("prompt")
    @classmethod
    def one_prompt(cls, value: Any) -> str | list:
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError("must be a string, a list holding one string, or a non-empty list of token ids")
        if all(isinstance(v, str) for v in value):
            if len(value) > 1:
                raise ValueError(f"{len(value)} prompts in one request are not supported; send one prompt per "
                                 "request")
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
            return value
        if all(isinstance(v, list) for v in value):
            if len(value) == 1:  # a batch of one token-id prompt (what evaluation harnesses send)
                return cls.one_prompt(value[0])
            raise ValueError("several token-id prompts in one request are not supported; send one per request")
        raise ValueError("a list prompt must hold strings or token ids (integers >= 0), not a mix")

    echo: bool | None = None
    suffix: None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    best_of: Literal[1] | None = None


class TokenizeRequest(_Strict):
    """`POST /tokenize`: a text prompt (tokenized as /v1/completions does) or chat messages (as the chat endpoint
    renders them, media excluded)."""
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e}); send a JSON object "
                          "with Content-Type: application/json") from None


def validate(cls: type[_Strict], data: Any) -> Any:
    """A parsed JSON body -> the request model, or a 400 that names every wrong field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        request = cls.model_validate(data)
    except ValidationError as e:
        errors = _most_specific(e.errors())
        problems = list(dict.fromkeys(f"{_where(err['loc'])}: {_explain(err)}" for err in errors))[:4]
        raise bad_request("invalid request: " + "; ".join(problems), param=_where(errors[0]["loc"])) from None
    return request


def _most_specific(errors: list[dict]) -> list[dict]:
    """A union field reports one error per branch: keep the deepest ones (a list of parts that failed inside says
    more than "not a string")."""
    locs = [tuple(p for p in err["loc"] if not _is_branch(p)) for err in errors]
    return [err for err, loc in zip(errors, locs)
            if not any(len(other) > len(loc) and other[:len(loc)] == loc for other in locs)]


def _is_branch(part) -> bool:
    """pydantic names union branches in locations ('str', 'list[...]', 'function-after[...]'): not fields."""
    return isinstance(part, str) and (part == "str" or part.startswith(("list[", "function-", "constrained-")))


def _where(loc: tuple) -> str:
    """('messages', 0, 'content', 'list[...]', 1, 'input_audio', 'input_audio', 'format') ->
    'messages[0].content[1].input_audio.format': branch names and repeated discriminator tags are dropped."""
    parts = [p for p in loc if not _is_branch(p)]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i + 1 < len(parts) and parts[i + 1] == part:
            continue  # the tag of a discriminated union, followed by the field of the same name
        else:
            out += f".{part}" if out else str(part)
    return out


def _explain(err: dict) -> str:
    if err["type"] == "missing":
        return "this field is required"
    if err["type"] in ("literal_error", "none_required") and err["loc"] and \
            err["loc"][-1] in ("echo", "suffix", "logprobs", "best_of"):
        return "not supported by this server"
    if err["type"] == "value_error":  # our own validators: their message is the whole explanation
        return str(err["ctx"]["error"]) if "ctx" in err else err["msg"].removeprefix("Value error, ")
    return f"{err['msg']} (got {_short(err.get('input'))})"


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, bytearray)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
