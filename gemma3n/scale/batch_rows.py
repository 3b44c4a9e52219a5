"""The rows of a batch job and how each is answered.

Two inputs:
- a JSONL file in the OpenAI Batch API format (as vLLM's `run_batch` reads it): each line
  `{"custom_id", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}`, the body
  exactly as `gemma3n serve` takes it. Each output line is OpenAI's batch output object
  `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}`; a request the server
  refuses keeps its status and the server's error body, and the job goes on;
- a folder of audio files (`transcribe`: each file as an upload to /v1/audio/transcriptions) or of images
  (`prompt`: each image with the prompt, as a chat completion), one output line `{"file", "status_code", "text",
  "error"}` per file.
"""
from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..server.errors import error_response

URLS = ("/v1/chat/completions", "/v1/completions")
AUDIO_SUFFIXES = (".wav", ".mp3", ".flac", ".ogg")  # what the server's audio check (libsndfile) reads
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
               ".webp": "image/webp"}


@dataclass(frozen=True)
class FolderTask:
    """What to ask of each file in a folder: transcribe it (audio), or answer `prompt` about it (images)."""

    transcribe: bool
    prompt: str | None = None
    model_name: str = "gemma3n"

    @property
    def suffixes(self) -> tuple[str, ...]:
        return AUDIO_SUFFIXES if self.transcribe else tuple(IMAGE_TYPES)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The server's error JSON for a refusal that happens before the request reaches it."""
    return json.loads(error_response(status, message, param, code).body)


def line_key(line: str):
    """The custom_id of a JSONL line (None if the line has none): what resuming matches rows by."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row.get("custom_id") if isinstance(row, dict) else None


def output_key(output: dict, folder: bool):
    return output.get("file") if folder else output.get("custom_id")


def repeated_key(custom_id) -> dict:
    """The output for a request whose custom_id an earlier row already has (resuming matches rows by it)."""
    return batch_output(custom_id, 400, error_body(400, f"custom_id {custom_id!r} repeats an earlier row's; "
                                                        "custom_ids must be unique within a batch",
                                                   param="custom_id"))


def batch_output(custom_id, status: int, body: dict) -> dict:
    return {"id": "batch_req_" + uuid.uuid4().hex, "custom_id": custom_id,
            "response": {"status_code": status, "request_id": "req_" + uuid.uuid4().hex, "body": body},
            "error": None}


def parse_request(line: str) -> tuple[object, str, bytes] | dict:
    """(custom_id, url, body bytes) of one JSONL line, or the output line that refuses it."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return batch_output(None, 400, error_body(400, f"this line is not valid JSON ({e}); each line must be one "
                                                       "request object"))
    if not isinstance(row, dict):
        return batch_output(None, 400, error_body(400, "this line must be a JSON object with custom_id, "
                                                       "method, url and body"))
    custom_id = row.get("custom_id")
    problem = None
    if not isinstance(custom_id, str) or not custom_id:
        problem = ("custom_id", "custom_id must be a non-empty string that names the request")
    elif row.get("method", "POST") != "POST":
        problem = ("method", f"method must be POST, got {row.get('method')!r}")
    elif row.get("url") not in URLS:
        problem = ("url", f"url {row.get('url')!r} is not supported; use one of {', '.join(URLS)}")
    elif not isinstance(row.get("body"), dict):
        problem = ("body", "body must be a JSON object: the request as the server takes it")
    elif row["body"].get("stream"):
        problem = ("body.stream", "streaming is not available in a batch job; leave out \"stream\"")
    if problem:
        return batch_output(custom_id if isinstance(custom_id, str) else None, 400,
                            error_body(400, problem[1], param=problem[0]))
    return custom_id, row["url"], json.dumps(row["body"]).encode()


async def answer_line(engine, line: str) -> dict:
    """The output line for one JSONL request line, answered by `engine` as the server answers it."""
    parsed = parse_request(line)
    if isinstance(parsed, dict):
        return parsed
    custom_id, url, body = parsed
    status, data = await engine.post(url, body)
    return batch_output(custom_id, status, _json_or_error(status, data))


async def answer_file(engine, task: FolderTask, name: str, data: bytes) -> dict:
    """The output line for one file of a folder job."""
    if task.transcribe:
        status, raw = await engine.post_file("/v1/audio/transcriptions", {"model": task.model_name,
                                                                          "response_format": "json"}, name, data)
        body = _json_or_error(status, raw)
        text = body.get("text") if status == 200 else None
    else:
        url = f"data:{IMAGE_TYPES.get(Path(name).suffix.lower(), 'image/png')};base64," + \
            base64.b64encode(data).decode()
        request = {"model": task.model_name, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": task.prompt}]}]}
        status, raw = await engine.post("/v1/chat/completions", json.dumps(request).encode())
        body = _json_or_error(status, raw)
        text = body["choices"][0]["message"]["content"] if status == 200 else None
    return {"file": name, "status_code": status, "text": text, "error": None if status == 200 else body.get("error")}


def _json_or_error(status: int, data: bytes) -> dict:
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_body(status if status >= 400 else 500, data.decode("utf-8", "replace")[:500] or
                          "the server gave an empty answer")
