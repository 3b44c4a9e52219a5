"""Operations endpoints: /metrics (parsed by the official Prometheus client), /tokenize and /detokenize."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gemma3n.server import ServerSettings

from .conftest import LIMITS, RunningServer


def _metrics(server) -> dict[tuple[str, tuple], float]:
    response = httpx.get(server.url + "/metrics", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def _value(metrics: dict, name: str, **labels) -> float:
    labels = {"model": "fresh", **labels}
    return metrics[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def fresh(model):
    running = RunningServer(model, ServerSettings(model_name="fresh", **LIMITS))
    yield running
    running.close()


def test_metrics_count_what_the_responses_report(fresh):
    before = _metrics(fresh)
    assert _value(before, "gemma3n_requests_total", outcome="length") == 0
    assert _value(before, "gemma3n_requests_running") == 0
    usages = []
    for text in ("one two three", "four five"):
        body = {"model": "fresh", "prompt": text, "max_tokens": 3, "temperature": 0}
        reply = httpx.post(fresh.url + "/v1/completions", json=body, timeout=60).json()
        usages.append(reply["usage"])
    refused = httpx.post(fresh.url + "/v1/completions", json={"model": "fresh", "prompt": "x", "max_tokens": "3"},
                         timeout=30)
    assert refused.status_code == 400
    after = _metrics(fresh)
    finished = sum(_value(after, "gemma3n_requests_total", outcome=o) for o in ("stop", "length"))
    assert finished == 2
    assert _value(after, "gemma3n_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert _value(after, "gemma3n_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert _value(after, "gemma3n_time_to_first_token_seconds_count") == 2
    assert _value(after, "gemma3n_time_to_first_token_seconds_bucket", le="+Inf") == 2
    assert _value(after, "gemma3n_time_to_first_token_seconds_sum") > 0
    assert _value(after, "gemma3n_batch_steps_total") >= 3 and _value(after, "gemma3n_requests_waiting") == 0


def test_tokenize_matches_what_generation_feeds_the_model(server, model):
    url = server.url
    text = "Hello there, general Kenobi"
    got = httpx.post(url + "/tokenize", json={"model": "tiny", "prompt": text}, timeout=30).json()
    assert got["tokens"] == model.tokenizer.encode(text, add_special_tokens=True)
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == model.config.text.max_position_embeddings
    bare = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=30).json()
    assert bare["tokens"] == model.tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": "hi"}]
    chat = httpx.post(url + "/tokenize", json={"messages": messages}, timeout=30).json()
    assert chat["tokens"] == model.encode_prompt(messages)[0].tolist()
    info = httpx.get(url + "/tokenizer_info", timeout=30).json()
    assert (info["bos_token"], info["eos_token"]) == (model.tokenizer.bos_token, model.tokenizer.eos_token)
    assert info["chat_template"] == model.tokenizer.chat_template
    back = httpx.post(url + "/detokenize", json={"model": "tiny", "tokens": bare["tokens"]}, timeout=30).json()
    assert back["prompt"] == model.tokenizer.decode(bare["tokens"])


@pytest.mark.parametrize("path, body, status, message", [
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "either 'prompt'"),
    ("/tokenize", {}, 400, "either 'prompt'"),
    ("/tokenize", {"model": "other", "prompt": "a"}, 404, "does not exist"),
    ("/detokenize", {"tokens": [10 ** 9]}, 400, "vocabulary size"),
    ("/detokenize", {"tokens": ["a"]}, 400, "tokens"),
])
def test_operations_refuse_bad_requests_clearly(server, path, body, status, message):
    response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code == status and message in response.json()["error"]["message"], response.text
    assert httpx.get(server.url + "/health", timeout=30).status_code == 200
