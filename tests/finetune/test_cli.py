"""The README's fine-tuning commands through the installed console script: finetune, run --adapter, merge; bad
data refused before anything starts; --resume continues a run exactly."""
from __future__ import annotations

import json
import pytest
import torch
from safetensors.torch import load_file

import gemma3n
from gemma3n.finetune import finetune

from ..console import gemma3n as console
from .tiny_data import words, write_jsonl

ROWS = [{"messages": [{"role": "user", "content": words(30 + i, 31)}, {"role": "assistant", "content": words(40 + i)}]}
        for i in range(4)]


def test_finetune_run_and_merge_through_the_console_script(tiny_base, tmp_path):
    _, base = tiny_base("mixed")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "adapter"
    done = console("finetune", "--model", str(base), "--data", str(data), "--output", str(out), "--max-steps", "2",
                   "--save-steps", "1", "--learning-rate", "1e-2", "--val-fraction", "0.25")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["steps"] == 2 and summary["val_loss"] is not None
    assert "step 2/2" in done.stderr and "tok/s" in done.stderr and "ETA" in done.stderr
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all("tokens_per_second" in r for r in log)
    assert (out / "adapter_config.json").exists() and (out / "checkpoint-1" / "adapter_model.safetensors").exists()

    ran = console("run", "--model", str(base), "--adapter", str(out), "-n", "3", "--quiet", words(30, 31))
    assert ran.returncode == 0, ran.stderr

    merged = tmp_path / "merged"
    done = console("merge", str(base), str(out), str(merged))
    assert done.returncode == 0, done.stderr
    ids = torch.randint(0, 380, (1, 16), generator=torch.Generator().manual_seed(0))
    with_adapter = gemma3n.load(base, adapter=out).logits(ids)
    assert torch.allclose(gemma3n.load(merged).logits(ids), with_adapter, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(gemma3n.load(base).logits(ids), with_adapter, rtol=1e-5, atol=1e-5)


def test_bad_lines_are_all_reported_before_anything_starts(tiny_base, tmp_path):
    _, base = tiny_base("mixed")
    data = write_jsonl(tmp_path / "bad.jsonl", [
        ROWS[0],
        "{not json",
        {"messages": [{"role": "user", "content": "w1"}]},
        {"messages": [{"role": "user", "content": "<image> w1"}, {"role": "assistant", "content": "w2"}]},
        {"messages": [{"role": "robot", "content": "w1"}]},
        {"prompt": "w1"},
        {"messages": [{"role": "user", "content": "<image> w1"}, {"role": "assistant", "content": "w2"}],
         "images": ["https://example.com/cat.png"]},
    ])
    done = console("finetune", "--model", str(base), "--data", str(data), "--output", str(tmp_path / "out"))
    assert done.returncode == 2
    for line, reason in ((2, "not valid JSON"), (3, "no assistant turn"), (4, "more <image> tags than images listed"),
                         (5, "role 'robot'"), (6, "needs 'messages'"), (7, "pass --allow-network")):
        reported = [text for text in done.stderr.splitlines() if f"bad.jsonl:{line}: " in text]
        assert len(reported) == 1 and reason in reported[0], done.stderr
    assert "bad.jsonl:1:" not in done.stderr and not (tmp_path / "out").exists()


def test_resume_continues_exactly(tiny_base, tmp_path):
    _, base = tiny_base("mixed")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    settings = dict(max_steps=4, save_steps=2, learning_rate=1e-2, lora_dropout=0.1, progress=False)
    finetune(base, data, tmp_path / "out", **settings)
    whole = load_file(tmp_path / "out" / "adapter_model.safetensors")
    # as if the run had stopped after its checkpoint at step 2: resume redoes steps 3 and 4
    resumed = finetune(base, data, tmp_path / "out", resume=True, **settings)
    assert [r["step"] for r in resumed.history] == [3, 4]
    again = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    log = [json.loads(line) for line in (tmp_path / "out" / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="other settings"):
        finetune(base, data, tmp_path / "out", resume=True, **{**settings, "lora_dropout": 0.1, "seed": 1})


@pytest.mark.slow  # two console runs with int4 quantisation at load: ~1 min on 2 shared cores
def test_qlora_on_a_float_folder_quantised_as_it_loads_then_resumed(tiny_base, tmp_path):
    _, base = tiny_base("mixed")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    out = tmp_path / "adapter"
    common = ("finetune", "--model", str(base), "--data", str(data), "--output", str(out), "--quantize", "int4",
              "--batch-size", "2", "--learning-rate", "1e-2", "--save-steps", "1", "--quiet")
    first = console(*common, "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    resumed = console(*common, "--max-steps", "3", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == 3  # from checkpoint-1: steps 2 and 3 again
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    model = gemma3n.load(base, quantize="int4", adapter=out)
    kinds = {type(m.base_layer).__name__ for m in model.lm.modules() if hasattr(m, "lora_A")}
    assert "Int4Linear" in kinds  # applied beside the quantised weights, which stay as they are


def test_target_regex_and_gradient_accumulation(tiny_base, tmp_path):
    _, base = tiny_base("mixed")
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = finetune(base, data, tmp_path / "out", target=r".*self_attn\.(q|v)_proj", gradient_accumulation=2,
                      max_steps=2, progress=False)
    assert result.trained_modules == 6 + 4  # q_proj in all 6 layers; v_proj only where K/V are not shared
    names = {k.split(".lora_")[0] for k in load_file(tmp_path / "out" / "adapter_model.safetensors")}
    assert all(n.endswith(("q_proj", "v_proj")) for n in names) and len(names) == 10
    assert result.steps == 2 and len(result.history) == 2  # 4 examples, 2 micro-batches per step: one epoch
    with pytest.raises(ValueError, match="matches no linear layer"):
        finetune(base, data, tmp_path / "none", target="nothing_here", max_steps=1, progress=False)
