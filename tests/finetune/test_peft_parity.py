"""Adapters against PEFT, the reference: ours load in transformers + PEFT with the same fp32 logits, PEFT's load
here likewise, and the first training step's loss is the loss transformers computes on the same batch and labels."""
from __future__ import annotations

import json

import pytest
import torch

import gemma3n
from gemma3n.finetune import finetune
from gemma3n.finetune import data as data_mod
from gemma3n.finetune.trainer import Trainer, TrainingArguments

from .tiny_data import words, write_jsonl

peft = pytest.importorskip("peft")

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": words(20, 21)}, {"role": "user", "content": words(30, 31, 32)},
                  {"role": "assistant", "content": words(40, 41)}, {"role": "user", "content": words(50)},
                  {"role": "assistant", "content": words(60, 61, 62)}]},
    {"messages": [{"role": "user", "content": words(33, 34)}, {"role": "assistant", "content": words(43, 44, 45)}]},
    {"text": words(70, 71, 72, 73, 74, 75)},
]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def probe_ids(vocab: int = 380) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(5))


def test_peft_made_adapter_gives_peft_logits(tiny_base, tmp_path):
    ref, base = tiny_base("mixed")
    model = peft.get_peft_model(_copy(ref), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; give it values so the adapter changes something
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    ids = probe_ids()
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits.float()
    got = gemma3n.load(base, adapter=tmp_path / "adapter").logits(ids)
    assert relative(got, want) <= 1e-4
    assert relative(gemma3n.load(base).logits(ids), want) > 1e-2  # the adapter matters at this scale


@pytest.mark.parametrize("name", ["mixed", "multimodal"])
def test_our_adapter_gives_the_same_logits_in_peft(tiny_base, tmp_path, name):
    ref, base = tiny_base(name)
    data = write_jsonl(tmp_path / "train.jsonl", CONVERSATIONS)
    result = finetune(base, data, tmp_path / "out", max_steps=3, learning_rate=5e-3, lora_dropout=0.0,
                              progress=False)
    assert result.steps == 3 and all(r["loss"] > 0 for r in result.history)
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 8 and saved["lora_alpha"] == 32
    from safetensors.torch import load_file
    keys = sorted(load_file(tmp_path / "out" / "adapter_model.safetensors"))
    decoder = "model.language_model." if name == "multimodal" else "model."
    assert f"base_model.model.{decoder}layers.3.self_attn.q_proj.lora_A.weight" in keys
    ids = probe_ids()
    model = peft.PeftModel.from_pretrained(_copy(ref), tmp_path / "out").eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
    got = gemma3n.load(base, adapter=tmp_path / "out").logits(ids)
    assert relative(got, want) <= 1e-4
    assert relative(gemma3n.load(base).logits(ids), want) > 1e-4  # training moved the logits


def test_first_step_loss_equals_transformers(tiny_base, tmp_path):
    ref, base = tiny_base("mixed")
    model = gemma3n.load(base, dtype="float32")
    items = data_mod.Encoder(model, 64).encode_all(
        data_mod.read_jsonl(write_jsonl(tmp_path / "d.jsonl", CONVERSATIONS)), "d.jsonl")
    # the label mask: assistant content and its <end_of_turn> only
    first = items[0]
    trained = [t for t, label in zip(first.input_ids, first.labels) if label != data_mod.IGNORE]
    assert trained == [40, 41, 106, 60, 61, 62, 106]
    batch = data_mod.collate(items, pad_id=0)
    trainer = Trainer(model, TrainingArguments(lora_dropout=0.0), tmp_path / "out", str(base))
    loss_sum, count = trainer.loss_sum(batch)
    with torch.no_grad():
        want = ref.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
    assert abs(float(loss_sum.detach()) / count - float(want)) <= 1e-5 * float(want)


def _copy(model):
    import copy
    return copy.deepcopy(model)
