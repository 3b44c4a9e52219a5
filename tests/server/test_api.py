"""The OpenAI endpoints through the official `openai` client: answers equal the engine's for the same request."""
from __future__ import annotations

import httpx
import pytest

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story"}]


def test_health_and_models(server, client):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_chat_equals_the_engine(client, alone, model):
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0)
    expected = alone(CHAT, max_new_tokens=24, temperature=0)
    assert reply.choices[0].message.content == expected.text and len(set(expected.text)) > 4
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == model.encode_prompt(CHAT).shape[1] == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.new_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_streaming_with_usage(client, alone):
    chunks = list(client.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=20,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    expected = alone(CHAT, max_new_tokens=20, temperature=0)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == expected.text and sum(bool(p) for p in pieces) > 3
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert len({c.id for c in chunks}) == 1


def test_content_parts_of_text_are_joined(client, alone):
    parts = [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story"}]
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                           max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == alone([{"role": "user", "content": "Tell me a story"}],
                                                     max_new_tokens=10, temperature=0).text


def test_stop_string_cuts_the_answer(client, alone):
    free = alone(CHAT, max_new_tokens=24, temperature=0).text
    stop = free[6:8]
    cut = free.index(stop)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == free[:cut]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_the_engine(client, alone):
    kw = dict(model="tiny", messages=CHAT, max_tokens=16, temperature=0.9, top_p=0.95, seed=11)
    first = client.chat.completions.create(**kw).choices[0].message.content
    assert client.chat.completions.create(**kw).choices[0].message.content == first
    assert first == alone(CHAT, max_new_tokens=16, temperature=0.9, top_p=0.95, seed=11).text
    assert client.chat.completions.create(**{**kw, "seed": 12}).choices[0].message.content != first


@pytest.mark.parametrize("stream", [False, True])
def test_text_completions(client, alone, stream):
    expected = alone("Once upon a time", raw=True, max_new_tokens=12, temperature=0)
    reply = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0,
                                      stream=stream)
    text = "".join(c.choices[0].text for c in reply) if stream else reply.choices[0].text
    assert text == expected.text
    if not stream:
        assert reply.usage.prompt_tokens == expected.prompt_tokens and reply.choices[0].finish_reason == "length"


def test_completion_from_token_ids_and_default_length(client, model):
    ids = model.tokenizer.encode("Once upon a time", add_special_tokens=True)
    by_ids = client.completions.create(model="tiny", prompt=ids, temperature=0)
    by_text = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
