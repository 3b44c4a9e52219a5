"""Many clients at once: batched decode, answers never mixed, bounded time, no memory growth, disconnects."""
from __future__ import annotations

import asyncio
import json
import sys
import time

import httpx
import pytest

PROMPTS = [f"Request number {i}: {'abcdefghij'[i % 10] * (1 + i % 7)}" for i in range(32)]


async def _stream_all(url: str, prompts: list[str], max_tokens: int) -> list[str]:
    import openai
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def one(prompt: str) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
            stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()


def test_32_concurrent_streams_each_equal_the_request_alone(server, alone):
    expected = [alone([{"role": "user", "content": p}], max_new_tokens=24, temperature=0).text for p in PROMPTS]
    assert len(set(expected)) > 16  # distinct answers, so a mix-up would show
    server.scheduler.peak_batch = 0
    start = time.perf_counter()
    got = asyncio.run(_stream_all(server.url, PROMPTS, 24))
    elapsed = time.perf_counter() - start
    assert got == expected
    assert elapsed < 60, f"32 streams took {elapsed:.1f} s"
    assert server.scheduler.peak_batch >= 16, "decode steps of concurrent requests were not batched"
    assert server.scheduler.active == 0 and server.scheduler.batch.cached_rows == 0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_memory_does_not_grow_across_rounds(server):
    rss = []
    for _ in range(4):
        asyncio.run(_stream_all(server.url, PROMPTS[:16], 16))
        rss.append(_rss_bytes())
    # The first round may still warm allocators and caches; later rounds must not keep growing.
    assert rss[-1] - rss[1] < 24 * 2 ** 20, f"RSS per round (MiB): {[r >> 20 for r in rss]}"
    assert server.scheduler.batch.cached_rows == 0 and server.scheduler.batch.groups == []


def test_client_disconnect_stops_generation_and_frees_the_cache(server, model):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 64,
            "temperature": 0, "stream": True}
    scheduler = server.scheduler
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert scheduler.active == 1
    deadline = time.time() + 10
    while scheduler.active and time.time() < deadline:
        time.sleep(0.05)
    assert scheduler.active == 0 and scheduler.batch.cached_rows == 0
    # The server is still serving.
    reply = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 4})
    assert reply.status_code == 200 and json.loads(reply.text)["usage"]["completion_tokens"] == 4
