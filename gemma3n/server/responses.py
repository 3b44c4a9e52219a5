"""OpenAI response objects (chat.completion, text_completion and their stream chunks) and server-sent events."""
from __future__ import annotations

import json
import time
import uuid

from .scheduler import Result


class Reply:
    """The identity of one response: its id, creation time and model name, shared by all of its chunks."""

    def __init__(self, model: str, chat: bool):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _envelope(self, kind: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, result: Result, **extras) -> dict:
        """The response; extras: `logprobs` as `chat_logprobs` / `completion_logprobs` made it, `echo` the prompt's
        text (completions with "echo": true), `content` and `tool_calls` (a chat answer parsed for tool calls)."""
        return self.choices([(result, extras)])

    def choices(self, answers: list[tuple[Result, dict]]) -> dict:
        """The response of `n` choices: (result, its extras) each; the prompt is counted once in the usage."""
        choices = []
        for index, (result, extras) in enumerate(answers):
            logprobs = extras.get("logprobs")
            if self.chat:
                message = {"role": "assistant", "content": extras.get("content", result.text)}
                finish = result.finish_reason
                if extras.get("tool_calls"):
                    message["tool_calls"] = extras["tool_calls"]
                    finish = "tool_calls" if finish == "stop" else finish
                choices.append({"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs})
            else:
                choices.append({"index": index, "text": extras.get("echo", "") + result.text,
                                "finish_reason": result.finish_reason, "logprobs": logprobs})
        return self._envelope("chat.completion" if self.chat else "text_completion", choices,
                              usage=usage([result for result, _ in answers]))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False, index: int = 0,
              logprobs: dict | None = None, tool_call: tuple[int, dict] | None = None) -> dict:
        """One stream chunk of choice `index`: a text piece (`logprobs` those of the tokens whose text it carries),
        the finish reason, the opening role, or one whole tool call (its index among the choice's calls, and the
        call: id, type, function name and arguments)."""
        if tool_call is not None:
            position, call = tool_call
            delta = {"tool_calls": [{"index": position, **call}]}
            return self._envelope("chat.completion.chunk", [{"index": index, "delta": delta, "finish_reason": None,
                                                             "logprobs": None}])
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, results: Result | list[Result]) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage=usage(results))


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    """A token as text and as its UTF-8 bytes; a byte-fallback piece (<0xE2>) is its one byte, whose text alone is
    not valid UTF-8 (OpenAI then gives the bytes, and text with a replacement character)."""
    piece = tokenizer.id_to_token(token) or ""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            byte = int(piece[3:5], 16)
            return bytes([byte]).decode("utf-8", errors="replace"), [byte]
        except ValueError:
            pass
    text = tokenizer.decode([token])
    return text, list(text.encode("utf-8"))


def chat_logprobs(tokenizer, entries: list) -> dict:
    """OpenAI's chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": None}."""
    def one(token: int, logprob: float) -> dict:
        text, raw = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": raw}

    return {"content": [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]}
                        for e in entries], "refusal": None}


def completion_logprobs(tokenizer, entries: list, prompt: list | None = None, first_prompt_token: int | None = None,
                        start: int = 0) -> dict:
    """OpenAI's legacy completion `logprobs`: tokens, token_logprobs, top_logprobs ({text: logprob}) and
    text_offset. With echo, the prompt's tokens come first; its first token has no logprob (null), as in OpenAI's
    and vLLM's answers."""
    tokens, values, tops, offsets = [], [], [], []
    offset = start

    def add(token: int, logprob, top) -> None:
        nonlocal offset
        text, _ = token_text(tokenizer, token)
        tokens.append(text)
        values.append(logprob)
        tops.append(None if top is None else {token_text(tokenizer, t)[0]: lp for t, lp in top})
        offsets.append(offset)
        offset += len(text)

    if prompt is not None:
        add(first_prompt_token, None, None)
        for e in prompt:
            add(e.token, e.logprob, e.top)
    for e in entries:
        add(e.token, e.logprob, e.top)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def usage(results: Result | list[Result]) -> dict:
    """OpenAI's usage of the choices of one prompt (counted once): `prompt_tokens_details.cached_tokens` are the
    prompt tokens resumed from the prefix cache rather than prefilled."""
    results = results if isinstance(results, list) else [results]
    prompt = results[0].prompt_tokens or 0
    completion = sum(result.completion_tokens for result in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": results[0].cached_tokens}}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
