"""Bad requests get the right status and a clear OpenAI-style error; the server keeps serving afterwards."""
from __future__ import annotations

import base64
import io

import httpx
import pytest

from .conftest import API_KEY, LIMITS

USER = [{"role": "user", "content": "hi"}]
OK = {"model": "tiny", "messages": USER, "max_tokens": 3, "temperature": 0}


def _post(server, path: str, headers=None, **kw) -> httpx.Response:
    return httpx.post(server.url + path, headers=headers, timeout=30, **kw)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _image_url(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64," + base64.b64encode(data).decode()}}


def _png() -> bytes:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def _chat_with(part) -> dict:
    return {**OK, "messages": [{"role": "user", "content": [{"type": "text", "text": "what is this?"}, part]}]}


BAD_CHAT = {
    "wrong type": ({**OK, "max_tokens": "ten"}, 400, "max_tokens: Input should be a valid integer"),
    "string temperature": ({**OK, "temperature": "0.5"}, 400, "temperature"),
    "missing messages": ({"model": "tiny"}, 400, "messages: this field is required"),
    "empty messages": ({**OK, "messages": []}, 400, "messages"),
    "unknown role": ({**OK, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    "unknown part": (_chat_with({"type": "video_url", "video_url": {}}), 400, "messages[0].content"),
    "n above 16": ({**OK, "n": 17}, 400, "n"),
    "top_p out of range": ({**OK, "top_p": 1.5}, 400, "top_p"),
    "max_tokens over the limit": ({**OK, "max_tokens": 10_000}, 400, f"at most {LIMITS['max_tokens']}"),
    "too many prompt tokens": ({**OK, "messages": [{"role": "user", "content": "word " * 400}]}, 400,
                               "this server accepts at most 300"),
    "bad base64 image": (_chat_with({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}),
                         400, "invalid base64 image data"),
    "not an image": (_chat_with(_image_url(b"plain text, not pixels")), 400, "not a readable image"),
    "remote URL not allowed": (_chat_with({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}),
                               400, "--allow-remote-media"),
    "local file": (_chat_with({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), 400,
                   "local files are never read"),
    "plain path": (_chat_with({"type": "image_url", "image_url": {"url": "/etc/passwd"}}), 400,
                   "local files are never read"),
    "too many images": ({**OK, "messages": [{"role": "user", "content": [_image_url(_png())] * 3}]}, 400,
                        "too many images"),
    "image on a text-only model": (_chat_with(_image_url(_png())), 400, "text-only"),
    "bad base64 audio": (_chat_with({"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}}), 400,
                         "invalid base64 audio data"),
    "audio format": (_chat_with({"type": "input_audio", "input_audio": {"data": "", "format": "ogg"}}), 400,
                     "format"),
    "bad tool name": ({**OK, "tools": [{"type": "function", "function": {"name": "two words"}}]}, 400,
                      "letters, digits"),
    "unsupported schema": ({**OK, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}}, 400, "uniqueItems"),
}


@pytest.mark.parametrize("case", list(BAD_CHAT))
def test_bad_chat_request(server, case):
    body, status, message = BAD_CHAT[case]
    error = _error(_post(server, "/v1/chat/completions", json=body), status)
    assert message in error["message"], error["message"]


def test_malformed_json_and_non_object(server):
    error = _error(_post(server, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                         headers={"content-type": "application/json"}), 400)
    assert "not valid JSON" in error["message"]
    assert "JSON object" in _error(_post(server, "/v1/completions", json=[1, 2]), 400)["message"]


def test_unknown_model(server):
    error = _error(_post(server, "/v1/chat/completions", json={**OK, "model": "gpt-4"}), 404)
    assert error["code"] == "model_not_found" and "'tiny'" in error["message"]
    assert _error(httpx.get(server.url + "/v1/models/gpt-4"), 404)["code"] == "model_not_found"


def test_oversized_body_is_413(server):
    big = {**OK, "messages": [{"role": "user", "content": "x" * (LIMITS["max_body_bytes"] + 10)}]}
    assert "larger than the limit" in _error(_post(server, "/v1/chat/completions", json=big), 413)["message"]

    def chunked():  # no Content-Length: the limit must hold while reading
        for _ in range(LIMITS["max_body_bytes"] // 4096 + 2):
            yield b" " * 4096
    _error(_post(server, "/v1/completions", content=chunked(), headers={"content-type": "application/json"}), 413)


def test_completion_errors(server):
    assert "vocabulary" in _error(_post(server, "/v1/completions", json={"model": "tiny", "prompt": [1, 10**6]}),
                                  400)["message"]
    assert "not supported" in _error(_post(server, "/v1/completions",
                                           json={"model": "tiny", "prompt": "a", "suffix": "b"}), 400)["message"]
    assert "prompt" in _error(_post(server, "/v1/completions", json={"model": "tiny", "prompt": []}), 400)["message"]


def test_unknown_route_and_method(server):
    assert "no route" in _error(httpx.get(server.url + "/v1/nothing"), 404)["message"]
    _error(httpx.get(server.url + "/v1/chat/completions"), 405)


def test_transcription_on_a_text_only_model_is_a_clear_400(server):
    import numpy as np
    import soundfile
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros(1600, dtype=np.float32), 16000, format="WAV")
    files = {"file": ("a.wav", buffer.getvalue(), "audio/wav")}
    error = _error(_post(server, "/v1/audio/transcriptions", files=files, data={"model": "tiny"}), 400)
    assert "text-only" in error["message"]
    error = _error(_post(server, "/v1/audio/translations", files={"file": ("a.wav", b"junk", "audio/wav")},
                         data={"model": "tiny"}), 400)
    assert "not readable audio" in error["message"]
    assert "'file'" in _error(_post(server, "/v1/audio/transcriptions", data={"model": "tiny"},
                                    files={"other": ("x", b"1")}), 400)["message"]
    assert "multipart" in _error(_post(server, "/v1/audio/transcriptions", json={"model": "tiny"}), 400)["message"]


def test_api_key(keyed_server):
    error = _error(_post(keyed_server, "/v1/chat/completions", json=OK), 401)
    assert "missing API key" in error["message"]
    wrong = _error(_post(keyed_server, "/v1/chat/completions", json=OK, headers={"Authorization": "Bearer nope"}),
                   401)
    assert wrong["message"] == "incorrect API key"
    _error(httpx.get(keyed_server.url + "/v1/models"), 401)
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # liveness needs no key
    import openai
    client = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key=API_KEY, max_retries=0)
    assert client.chat.completions.create(**OK).usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="bad", max_retries=0).models.list()


def test_still_serving_after_the_errors(server, client):
    reply = client.chat.completions.create(**OK)
    assert reply.usage.completion_tokens == 3 and server.scheduler.active == 0
