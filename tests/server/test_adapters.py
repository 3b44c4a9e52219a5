"""Adapters served beside the base (`gemma3n serve --adapter NAME=DIR`), in process on the tiny checkpoint: each is
listed as a model, a request's `model` picks it, an unknown id is a 404 (the console test on the real 270M is
tests/server/test_console_adapters.py; the arithmetic is tests/finetune/test_multi_lora.py)."""
from __future__ import annotations

import httpx
import pytest
import torch

import gemma3n
from gemma3n.cli import split_adapters
from gemma3n.engine.batch import ContinuousBatch
from gemma3n.server import ServerSettings, create_app

from .conftest import LIMITS, RunningServer


def random_adapter(model, folder, seed: int, target: str):
    from gemma3n.adapters.lora import inject, select_targets
    from gemma3n.adapters.peft_format import external_name, save_adapter
    copy = gemma3n.load(model.path)
    paths = select_targets(copy.lm, target, external_name(copy.config))
    g = torch.Generator().manual_seed(seed)
    for wrapper in inject(copy.lm, paths, 4, 8.0).values():
        with torch.no_grad():
            wrapper.lora_A.weight.copy_(torch.randn(wrapper.lora_A.weight.shape, generator=g) * 0.3)
            wrapper.lora_B.weight.copy_(torch.randn(wrapper.lora_B.weight.shape, generator=g) * 0.3)
    save_adapter(folder, copy.lm, copy.config, str(model.path), 4, 8.0, 0.0)
    return folder


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    work = tmp_path_factory.mktemp("adapters")
    folders = {"a": random_adapter(model, work / "a", 1, "all-linear"),
               "b": random_adapter(model, work / "b", 2, r".*self_attn\.(q|o)_proj")}
    multi = gemma3n.load(model.path, adapters=folders)
    running = RunningServer(multi, ServerSettings(model_name="tiny", **LIMITS))
    yield multi, running
    running.close()


def alone(multi, prompt: str, adapter: str | None, tokens: int = 8) -> str:
    ids = torch.tensor([multi.tokenizer.encode(prompt, add_special_tokens=True)])
    batch = ContinuousBatch(multi.decoder, adapters=multi.adapters)
    seq = batch.add(ids, multi.sampling_params(max_new_tokens=tokens, temperature=0.0), multi.stop_ids(),
                    adapter=adapter)
    while len(batch):
        batch.step()
    return multi.tokenizer.decode(seq.new_ids)


def test_models_lists_the_base_and_each_adapter(served):
    _, running = served
    listed = httpx.get(running.url + "/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "a", "b"]
    assert [m.get("parent") for m in listed] == [None, "tiny", "tiny"]
    assert httpx.get(running.url + "/v1/models/b").json()["id"] == "b"
    assert httpx.get(running.url + "/v1/models/c").status_code == 404


def test_the_request_model_picks_the_adapter(served):
    multi, running = served
    answers = {}
    for name in ("tiny", "a", "b"):
        r = httpx.post(running.url + "/v1/completions", json={"model": name, "prompt": "abc de", "max_tokens": 8,
                                                               "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["model"] == name
        answers[name] = r.json()["choices"][0]["text"]
        assert answers[name] == alone(multi, "abc de", None if name == "tiny" else name)
    assert len(set(answers.values())) == 3


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_model_is_an_openai_404(served, path):
    _, running = served
    body = {"model": "c", "max_tokens": 2, "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(running.url + path, json=body)
    error = r.json()["error"]
    assert r.status_code == 404 and error["code"] == "model_not_found" and error["param"] == "model"
    assert "'tiny', 'a', 'b'" in error["message"]


def test_an_adapter_may_not_take_the_base_models_name(served):
    multi, _ = served
    with pytest.raises(ValueError, match="named like the base"):
        create_app(multi, ServerSettings(model_name="a"))


def test_adapter_flags_split_into_merged_and_named(tmp_path):
    assert split_adapters([]) == (None, None)
    assert split_adapters(["x/dir"]) == ("x/dir", None)
    assert split_adapters(["a=x/dir", "b=y", "plain"]) == ("plain", {"a": "x/dir", "b": "y"})
    odd = tmp_path / "has=sign"
    odd.mkdir()
    assert split_adapters([str(odd)]) == (str(odd), None)  # an existing folder is a folder, '=' or not
    with pytest.raises(ValueError, match="given twice"):
        split_adapters(["a=x", "a=y"])
    with pytest.raises(ValueError, match="several unnamed"):
        split_adapters(["x", "y"])
