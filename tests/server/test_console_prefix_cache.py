"""Prefix caching on the real Gemma 3 270M through `gemma3n serve`: each next turn of a long chat (longer than the
512-token sliding window) prefills only its new tokens and answers what a server without the cache answers."""
from __future__ import annotations

import httpx
import pytest

from .test_console_serve import ServeProcess


def _chat(url: str, messages: list) -> dict:
    body = {"model": "m", "messages": messages, "max_tokens": 40, "temperature": 0, "logprobs": True}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=600)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_long_chat_turns_prefill_only_new_tokens_on_the_real_270m():
    from gemma3n.cli import default_model_path
    gguf = str(default_model_path())
    on = ServeProcess("--model", gguf, "--served-model-name", "m")
    off = ServeProcess("--model", gguf, "--served-model-name", "m", "--prefix-cache-mb", "0")
    try:
        notes = " ".join(f"Note {i}: the harbour light turns every {i % 7 + 2} seconds." for i in range(45))
        history = [{"role": "system", "content": "You are a helpful assistant who answers briefly."},
                   {"role": "user", "content": f"Here are my notes.\n{notes}\nWhat do the notes describe?"}]
        previous = None
        for question in ("Which note has the fastest light?", "Say that again in five words.", None):
            cached, cold = _chat(on.url, history), _chat(off.url, history)
            assert cached["choices"][0]["message"] == cold["choices"][0]["message"]
            assert cached["choices"][0]["logprobs"]["content"][0]["logprob"] == pytest.approx(
                cold["choices"][0]["logprobs"]["content"][0]["logprob"], abs=2e-3)
            usage = cached["usage"]
            assert usage["prompt_tokens"] == cold["usage"]["prompt_tokens"]
            if previous is None:
                assert usage["prompt_tokens"] > 600  # past the sliding window
                assert usage["prompt_tokens_details"]["cached_tokens"] == 0
            else:
                # all of the previous prompt and answer but the answer's last token (sampled, never fed) is reused;
                # only the end of that turn and the new question are prefilled
                reused = usage["prompt_tokens_details"]["cached_tokens"]
                assert reused == previous["prompt_tokens"] + previous["completion_tokens"] - 1
                assert usage["prompt_tokens"] - reused < 30
            previous = usage
            if question is not None:
                history = history + [cached["choices"][0]["message"], {"role": "user", "content": question}]
        metrics = httpx.get(on.url + "/metrics", timeout=30).text
        assert "gemma3n_prefix_cache_hits_total" in metrics
    finally:
        on.close()
        off.close()
