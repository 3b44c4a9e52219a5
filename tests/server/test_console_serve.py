"""`gemma3n serve` as a person starts it: the installed console script in its own process, real clients over
loopback. (A green in-process suite once hid a `serve` that could not start.)"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from ..console import start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    def __init__(self, *args: str, startup_seconds: float = 300):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = start("serve", "--port", str(self.port), *args)
        deadline = time.time() + startup_seconds
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gemma3n serve exited ({self.process.returncode}): {self.process.stderr.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                self.close()
                raise RuntimeError("gemma3n serve did not answer /health in time")
            time.sleep(0.2)

    def health(self) -> dict:
        return httpx.get(self.url + "/health", timeout=10).json()

    def rss_mib(self) -> float:
        with open(f"/proc/{self.process.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def close(self) -> str:
        self.process.terminate()
        try:
            _, err = self.process.communicate(timeout=30)
        except Exception:
            self.process.kill()
            _, err = self.process.communicate()
        return err


@pytest.fixture(scope="module")
def served(checkpoint):
    running = ServeProcess("--model", str(checkpoint), "--served-model-name", "tiny", "--max-tokens", "1500",
                           "--max-body-bytes", str(8 << 20), "--max-prompt-tokens", "1000", "--max-batch", "64")
    yield running
    running.close()


def wait_idle(served: ServeProcess, seconds: float) -> float:
    """Seconds until the server runs nothing (or `seconds` if it never does)."""
    start_ = time.perf_counter()
    while time.perf_counter() - start_ < seconds:
        if served.health()["active"] == 0:
            return time.perf_counter() - start_
        time.sleep(0.01)
    return seconds


def test_serve_starts_and_answers_the_openai_client(served):
    import openai
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    messages = [{"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert whole.usage.completion_tokens >= 1 and whole.choices[0].finish_reason in ("stop", "length")
    pieces = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in pieces if c.choices) == whole.choices[0].message.content
    text = client.completions.create(model="tiny", prompt="abc", max_tokens=4, temperature=0)
    assert text.usage.completion_tokens == 4


def test_health_answers_while_a_maximal_request_is_refused(served):
    """A body at the size limit, all prompt text, is refused without blocking the event loop."""
    body = json.dumps({"model": "tiny", "prompt": "ab " * ((8 << 20) // 3 - 40), "max_tokens": 4}).encode()
    assert len(body) <= 8 << 20
    answer: dict = {}
    sender = threading.Thread(target=lambda: answer.update(r=httpx.post(
        served.url + "/v1/completions", content=body, headers={"Content-Type": "application/json"}, timeout=120)))
    sender.start()
    worst = 0.0
    while sender.is_alive():
        t = time.perf_counter()
        assert served.health()["status"] == "ok"
        worst = max(worst, time.perf_counter() - t)
        time.sleep(0.02)
    assert answer["r"].status_code == 400 and answer["r"].json()["error"]["code"] == "context_length_exceeded"
    assert worst < 0.5, f"/health took {worst:.2f} s while the request was refused"


def test_lone_surrogate_is_a_clear_400(served):
    body = '{"model": "tiny", "messages": [{"role": "user", "content": "abc\\udcff"}], "max_tokens": 2}'
    r = httpx.post(served.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "lone surrogate U+DCFF" in r.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_is_cancelled_at_once(served, stream):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on and on"}], "max_tokens": 1500,
            "temperature": 1.0, "seed": 3, "stream": stream}
    t = time.perf_counter()
    r = httpx.post(served.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 100}, timeout=60)
    per_token = (time.perf_counter() - t) / r.json()["usage"]["completion_tokens"]  # a decode step, about
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", served.port)) as conn:
        conn.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
        if stream:
            received = b""
            while received.count(b"data: ") < 3:  # the role chunk, then tokens: it is generating
                received += conn.recv(65536)
        else:
            while served.health()["active"] == 0:
                time.sleep(0.01)
            time.sleep(20 * per_token)  # past its prompt, decoding
    # Leaving the block closed the connection mid-answer: it stops within a step or so (a loaded machine's
    # scheduling aside), long before its 1500 tokens.
    idle_after = wait_idle(served, 30)
    assert idle_after < max(0.5, 10 * per_token), f"still generating {idle_after:.2f} s after the client left"
    assert idle_after < 1500 * per_token / 10


def _chat(url: str, prompts: list[str], concurrent: int) -> list[str]:
    async def one(client, prompt):
        r = await client.post(url + "/v1/chat/completions", json={
            "model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    async def run():
        limits = httpx.Limits(max_connections=concurrent)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*[one(client, p) for p in prompts])
    return asyncio.run(run())


PROMPTS = [f"w{3 * i} w{7 * i % 97} w{i % 13}" for i in range(48)]


def test_concurrent_greedy_answers_equal_each_request_alone(served):
    alone = [_chat(served.url, [p], 1)[0] for p in PROMPTS]
    assert len(set(alone)) > 24  # distinct answers, so a mix-up would show
    for concurrent in (16, 17, 48):
        assert _chat(served.url, PROMPTS[:concurrent], concurrent) == alone[:concurrent], concurrent


@pytest.mark.slow
def test_resident_memory_returns_after_rounds_of_requests():
    """The real 270M behind `gemma3n serve` (its default model): three rounds of 50 concurrent requests leave the
    resident set where the first round left it. Before the idle heap trim it ratcheted up (+660 MiB over 5 rounds here)."""
    server = ServeProcess()
    try:
        async def one(client, i):
            r = await client.post(server.url + "/v1/completions", json={
                "model": "gemma-3-270m-q4_k_m", "prompt": f"Number {i} is", "max_tokens": 24, "temperature": 0})
            assert r.status_code == 200, r.text

        async def round_():
            async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
                await asyncio.gather(*[one(client, i) for i in range(50)])
        sizes = []
        for _ in range(3):
            asyncio.run(round_())
            wait_idle(server, 10)
            time.sleep(0.5)  # the model thread gives freed pages back once it is idle
            sizes.append(server.rss_mib())
        # The first round warms allocators and the per-cache native descriptions; later rounds must not grow.
        assert max(sizes[1:]) - sizes[0] < 64, f"RSS after each round (MiB): {[round(s) for s in sizes]}"
    finally:
        server.close()
