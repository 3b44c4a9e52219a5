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

    def whole(self, result: Result) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": result.finish_reason, "logprobs": None}
            return self._envelope("chat.completion", [choice], usage=usage(result))
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice], usage=usage(result))

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, result: Result) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage=usage(result))


def usage(result: Result) -> dict:
    prompt = result.prompt_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": result.completion_tokens,
            "total_tokens": prompt + result.completion_tokens}


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
