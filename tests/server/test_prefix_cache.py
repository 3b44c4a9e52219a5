"""Prefix caching through the server: the next turn of a chat resumes from the K/V of the previous turn's prompt
and answer, reports them as `usage.prompt_tokens_details.cached_tokens`, answers what a server without the cache
answers, and /metrics counts the hits. Request ids: the client's X-Request-Id is echoed, or one is made."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemma3n.server import ServerSettings

from .conftest import LIMITS, RunningServer


@pytest.fixture(scope="module")
def pair(model):
    """Two servers of the same model: prefix cache on (the default) and off."""
    on = RunningServer(model, ServerSettings(model_name="tiny", **LIMITS))
    off = RunningServer(model, ServerSettings(model_name="tiny", prefix_cache_mb=0, **LIMITS))
    yield on, off
    on.close()
    off.close()


def _chat(server, messages, **extra) -> dict:
    body = {"model": "tiny", "messages": messages, "max_tokens": 12, "temperature": 0, **extra}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return {sample.name + "".join(f"|{v}" for k, v in sorted(sample.labels.items()) if k != "model"): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_next_chat_turn_prefills_only_its_new_tokens(pair, model):
    on, off = pair
    history = [{"role": "system", "content": "You answer in few words, and always about the sea and its ships."},
               {"role": "user", "content": "What is a mast made of, and how tall can it be?"}]
    turns = []
    for question in ("And a sail?", "Who sews them?"):
        first, first_off = _chat(on, history), _chat(off, history)
        assert first["choices"][0]["message"] == first_off["choices"][0]["message"]
        history = history + [first["choices"][0]["message"], {"role": "user", "content": question}]
        turns.append((first, _chat(on, history), _chat(off, history)))
    for first, cached, cold in turns:
        assert cached["choices"][0]["message"] == cold["choices"][0]["message"]
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        new_prompt = cached["usage"]["prompt_tokens"]
        reused = cached["usage"]["prompt_tokens_details"]["cached_tokens"]
        # at least the previous prompt is reused (the answer too where the chat template renders it as the tokens
        # the model chose: this byte-level tokenizer's answers begin with a newline the template trims; the real
        # 270M's test, test_console_prefix_cache.py, checks that)
        assert reused >= first["usage"]["prompt_tokens"]
        assert new_prompt > reused
    metrics = _metrics(on)
    assert metrics["gemma3n_prefix_cache_hits_total"] >= sum(c["usage"]["prompt_tokens_details"]["cached_tokens"]
                                                             for _, c, _ in turns)
    assert metrics["gemma3n_prefix_cache_requests_total|hit"] >= 2
    assert metrics["gemma3n_prefix_cache_entries"] >= 1 and metrics["gemma3n_prefix_cache_bytes"] > 0
    assert not any(name.startswith("gemma3n_prefix_cache") for name in _metrics(off))


def test_streamed_usage_reports_cached_tokens(pair):
    on, _ = pair
    messages = [{"role": "user", "content": "Name three colours of the evening sky over the harbour."}]
    _chat(on, messages)
    usage = None
    with httpx.stream("POST", on.url + "/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": messages, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and '"usage"' in line:
                import json
                usage = json.loads(line[6:])["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_request_ids_are_echoed_or_made(pair, caplog):
    on, _ = pair
    body = {"model": "tiny", "prompt": "one two", "max_tokens": 2}
    with caplog.at_level("INFO", logger="gemma3n.server"):
        given = httpx.post(on.url + "/v1/completions", json=body, headers={"X-Request-Id": "abc-123"}, timeout=60)
        made = httpx.post(on.url + "/v1/completions", json=body, timeout=60)
        bad = httpx.post(on.url + "/v1/completions", json=body, headers={"X-Request-Id": "x" * 500}, timeout=60)
        refused = httpx.post(on.url + "/v1/completions", json={**body, "max_tokens": -1},
                             headers={"X-Request-Id": "bad-1"}, timeout=60)
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32 and len(bad.headers["x-request-id"]) == 32
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "bad-1"
    lines = [r.getMessage() for r in caplog.records]
    assert any("abc-123" in line and "POST /v1/completions 200" in line for line in lines)
    assert any("abc-123" in line and "prompt tokens" in line for line in lines)  # the scheduler's line
    assert any("bad-1" in line and " 400 " in line for line in lines)
