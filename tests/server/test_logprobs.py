"""Log-probabilities through the server (chat logprobs, completions logprobs + echo), against transformers' own
log-softmax of the same checkpoint, and through the official openai client."""
from __future__ import annotations

import httpx
import pytest
import torch

from ..reference.tiny import build_reference


@pytest.fixture(scope="module")
def reference():
    """transformers' model of the served checkpoint (conftest builds it with this seed), float32."""
    return build_reference("mixed", seed=5).float().eval()


def _reference_logprobs(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = reference(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)  # row i: the distribution of token i + 1


def test_completion_echo_logprobs_match_transformers(server, model, reference):
    prompt = model.tokenizer.encode("one two three four", add_special_tokens=True)
    body = {"model": "tiny", "prompt": [prompt], "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}
    reply = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    choice = reply["choices"][0]
    lp = choice["logprobs"]
    n_new = reply["usage"]["completion_tokens"]
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=3, temperature=0)[0].tolist()[:n_new]
    full = prompt + generated
    ref = _reference_logprobs(reference, full)
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(full)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    want = [float(ref[i - 1, full[i]]) for i in range(1, len(full))]
    assert lp["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"][1:], start=1):
        best = torch.topk(ref[i - 1], 2).values.tolist()
        assert len(top) == 2 and sorted(top.values(), reverse=True) == pytest.approx(best, abs=1e-4)
    # greedy: every generated token is the most likely one (lm-evaluation-harness's is_greedy test)
    assert all(lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values()) for i in range(len(prompt), len(full)))
    assert choice["text"].startswith(model.tokenizer.decode(prompt))
    assert lp["text_offset"] == sorted(lp["text_offset"])


def test_chat_logprobs_through_the_openai_client(client, model, reference):
    messages = [{"role": "user", "content": "count with me"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0,
                                           logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    prompt = model.encode_prompt(messages)[0].tolist()
    new = [t for t in model.generate(torch.tensor([prompt]), max_new_tokens=4, temperature=0)[0].tolist()
           if t not in model.stop_ids()]
    assert len(content) == len(new) == reply.usage.completion_tokens - (reply.choices[0].finish_reason == "stop")
    ref = _reference_logprobs(reference, prompt + new)
    for i, entry in enumerate(content):
        position = len(prompt) + i - 1
        assert entry.logprob == pytest.approx(float(ref[position, new[i]]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(torch.topk(ref[position], 3).values.tolist(),
                                                                         abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token and bytes(entry.bytes) == entry.token.encode("utf-8")


@pytest.mark.parametrize("path, body, message", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "needs \"logprobs\": true"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 1, "echo": True, "stream": True}, "not available with"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
])
def test_logprob_requests_refused_clearly(server, path, body, message):
    base = {"model": "tiny", "max_tokens": 2}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    response = httpx.post(server.url + path, json={**base, **body}, timeout=30)
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_n_choices_are_each_a_reproducible_sequence(client):
    messages = [{"role": "user", "content": "tell me something"}]
    sampling = dict(model="tiny", messages=messages, max_tokens=6, temperature=1.0, seed=5)
    many = client.chat.completions.create(n=3, **sampling)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [client.chat.completions.create(**{**sampling, "seed": 5 + i}) for i in range(3)]
    assert [c.message.content for c in many.choices] == [s.choices[0].message.content for s in singles]
    assert many.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert many.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    greedy = client.completions.create(model="tiny", prompt="one two", max_tokens=4, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_n_and_logprobs_stream_as_openai_does(client):
    """Streamed choices carry their `index` and the logprobs of the tokens of each chunk; put together they are the
    answer the same request gets without streaming."""
    messages = [{"role": "user", "content": "tell me a story"}]
    sampling = dict(model="tiny", max_tokens=8, temperature=1.0, seed=11, n=3)
    whole = client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, **sampling)
    texts, entries, finish = {}, {}, {}
    usage = None
    for chunk in client.chat.completions.create(messages=messages, logprobs=True, top_logprobs=2, stream=True,
                                                stream_options={"include_usage": True}, **sampling):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            entries.setdefault(choice.index, []).extend(choice.logprobs.content if choice.logprobs else [])
            finish[choice.index] = choice.finish_reason or finish.get(choice.index)
    assert sorted(texts) == [0, 1, 2]
    for choice in whole.choices:
        assert texts[choice.index] == choice.message.content and finish[choice.index] == choice.finish_reason
        assert [e.token for e in entries[choice.index]] == [e.token for e in choice.logprobs.content]
        assert [e.logprob for e in entries[choice.index]] == pytest.approx(
            [e.logprob for e in choice.logprobs.content], abs=1e-4)
        assert len(entries[choice.index][0].top_logprobs) == 2
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens

    sampling = dict(model="tiny", prompt="one two three", max_tokens=6, temperature=0.8, seed=3, n=2, logprobs=2)
    whole = client.completions.create(**sampling)
    texts, tokens, offsets = {}, {}, {}
    for chunk in client.completions.create(stream=True, **sampling):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.logprobs is not None:
                tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
                offsets.setdefault(choice.index, []).extend(choice.logprobs.text_offset)
    for choice in whole.choices:
        assert texts[choice.index] == choice.text
        assert tokens[choice.index] == choice.logprobs.tokens and offsets[choice.index] == choice.logprobs.text_offset
