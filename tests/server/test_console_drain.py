"""`gemma3n serve` stopped as an operator stops it (SIGTERM, or Ctrl-C's SIGINT): it stops accepting at once,
finishes the requests it is running, and exits; its log names every request by its id."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from .test_console_serve import ServeProcess


def _stream(url: str, body: dict, events: list, signalled: threading.Event) -> None:
    """Read a streamed completion, noting for each chunk whether the server had been signalled already."""
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"X-Request-Id": "drain-me"},
                          timeout=120) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append((signalled.is_set(), line[6:]))
    except httpx.HTTPError as e:  # cut by the drain deadline
        events.append((signalled.is_set(), e))


def test_sigterm_drains_running_requests_then_exits(checkpoint):
    sig = signal.SIGTERM
    served = ServeProcess("--model", str(checkpoint), "--served-model-name", "tiny", "--max-tokens", "1500",
                          "--drain-seconds", "60")
    try:
        body = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 300, "temperature": 0}
        whole = httpx.post(served.url + "/v1/completions", json=body, timeout=120).json()
        assert whole["usage"]["completion_tokens"] >= 100  # long enough to be running when the signal comes
        events, signalled = [], threading.Event()
        reader = threading.Thread(target=_stream, args=(served.url, {**body, "stream": True, "stream_options": {
            "include_usage": True}}, events, signalled))
        reader.start()
        while not events:
            time.sleep(0.005)
        signalled.set()
        served.process.send_signal(sig)
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(served.url + "/health", timeout=5)
        reader.join(timeout=120)
        code = served.process.wait(timeout=60)
        log = served.process.stderr.read()
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
    assert code in (0, -sig), log  # uvicorn re-raises the signal once drained: a stop by that signal
    assert any(after for after, _ in events), "the stream ended before the signal"
    assert events[-1][1] == "[DONE]"
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]
    assert "request drain-me: POST /v1/completions 200" in log and "request drain-me: length" in log


def test_ctrl_c_drains_too_with_a_deadline(checkpoint):
    served = ServeProcess("--model", str(checkpoint), "--served-model-name", "tiny", "--max-tokens", "1500",
                          "--drain-seconds", "0.5")
    try:
        events, signalled = [], threading.Event()
        body = {"model": "tiny", "prompt": "w1 w2 w3", "max_tokens": 1500, "temperature": 0, "stream": True}
        reader = threading.Thread(target=_stream, args=(served.url, body, events, signalled), daemon=True)
        reader.start()
        while not events:
            time.sleep(0.005)
        started = time.perf_counter()
        served.process.send_signal(signal.SIGINT)
        code = served.process.wait(timeout=60)
        assert code in (0, -signal.SIGINT) and time.perf_counter() - started < 30
        assert isinstance(events[-1][1], Exception)  # 1500 tokens were cut after half a second
    finally:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()
