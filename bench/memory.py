"""Peak memory, load time and decode speed of `gemma3n run` on the E2B-shape checkpoint: bf16, int8, int4, beside
transformers bf16 on the same checkpoint, each in its own process, in one run.

    python bench/make_e2b_checkpoint.py /work/e2b                      # once: random weights, exact E2B shape
    gemma3n quantize /work/e2b /work/e2b-int8 --scheme int8            # once each
    gemma3n quantize /work/e2b /work/e2b-int4 --scheme int4
    python bench/memory.py --bf16 /work/e2b --int8 /work/e2b-int8 --int4 /work/e2b-int4 \
        --extra "int4 + int4 embeddings=/work/e2b-int4e"

Text prompt of 128 tokens (after the chat template), 32 new tokens, greedy. Peak RSS is the child's maximum
resident set (os.wait4), which counts the memory-mapped file pages it touched as well as its own allocations.
A row "bf16 + --quantize int4" quantises while loading. The JSON line printed last holds every row.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 32
WORDS = ("The history of the river valley is long and varied: farmers, traders and travellers crossed it for "
         "centuries, leaving roads, mills, bridges and stories behind them. ").split()

TRANSFORMERS_CHILD = r"""
import json, sys, time, torch
from transformers import AutoTokenizer, Gemma3nForConditionalGeneration
path, ids = sys.argv[1], json.loads(sys.argv[2])
start = time.perf_counter()
model = Gemma3nForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
load = time.perf_counter() - start
x = torch.tensor([ids])
with torch.inference_mode():
    t0 = time.perf_counter(); model.generate(x, max_new_tokens=1, do_sample=False); prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(x, max_new_tokens=%d, min_new_tokens=%d, do_sample=False)
    total = time.perf_counter() - t0
new = out.shape[1] - x.shape[1]
print(json.dumps({"load_seconds": load, "prompt_tokens": x.shape[1], "new_tokens": new,
                  "decode_tokens_per_second": (new - 1) / (total - prefill)}))
""" % (NEW_TOKENS, NEW_TOKENS)


def prompt_of(folder: Path, tokens: int) -> tuple[str, list[int]]:
    """A prompt whose encoding as `gemma3n run` builds it (chat template if any) is exactly `tokens` long."""
    sys.path.insert(0, str(ROOT))
    from gemma3n.processor.chat import render_chat
    from gemma3n.processor.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained_dir(folder)

    def encode(text: str) -> list[int]:
        if not tok.chat_template:  # as `gemma3n run`: raw text after BOS when the checkpoint has no template
            return tok.encode(text, add_special_tokens=True)
        rendered = render_chat([{"role": "user", "content": text}], tok.chat_template, add_generation_prompt=True,
                               bos_token=tok.bos_token or "<bos>", eos_token=tok.eos_token or "<eos>")
        return tok.encode(rendered, add_special_tokens=False)

    words = []
    while len(encode(" ".join(words))) < tokens:
        words.append(WORDS[len(words) % len(WORDS)])
    text = " ".join(words)
    while len(encode(text)) > tokens:  # the last word may have added several tokens: trim characters
        text = text[:-1]
    ids = encode(text)
    if len(ids) != tokens:
        raise SystemExit(f"could not build a prompt of exactly {tokens} tokens (got {len(ids)})")
    return text, ids


def run_child(command: list[str]) -> dict:
    """Run a child; its JSON (last stdout line) with the peak RSS of exactly this child (os.wait4 on its pid)."""
    start = time.perf_counter()
    with open(os.devnull, "w") as devnull:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=devnull, text=True, cwd=ROOT)
        out = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.strip().splitlines()[-1])
    rss = usage.ru_maxrss * 1024  # kilobytes on Linux
    return {"peak_rss_gib": round(rss / 2**30, 3), "load_seconds": round(result["load_seconds"], 2),
            "decode_tokens_per_second": round(result["decode_tokens_per_second"], 2),
            "prompt_tokens": result["prompt_tokens"], "new_tokens": result["new_tokens"],
            "wall_seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", type=Path, required=True, help="the E2B-shape bf16 checkpoint folder")
    parser.add_argument("--int8", type=Path, help="its `gemma3n quantize --scheme int8` copy")
    parser.add_argument("--int4", type=Path, help="its `gemma3n quantize --scheme int4` copy")
    parser.add_argument("--extra", action="append", default=[], metavar="LABEL=FOLDER",
                        help="another quantised copy to measure, e.g. 'int4 + int4 embeddings=/work/e2b-int4e'")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--ours-python", default=sys.executable,
                        help="interpreter for the gemma3n rows, e.g. .venv-run/bin/python (the CPU torch build that "
                             "scripts/run.sh installs: its import is ~0.29 GiB smaller than the test env's CUDA build)")
    parser.add_argument("--peer-python", default=sys.executable, help="interpreter for the transformers row")
    args = parser.parse_args()
    text, ids = prompt_of(args.bf16, 128)
    ours = [args.ours_python, "-m", "gemma3n.cli", "run", "--json", "--temperature", "0", "--max-new-tokens",
            str(NEW_TOKENS)]
    rows = {}
    runs = [("gemma3n bf16", [*ours, "--model", str(args.bf16), text]),
            ("gemma3n int8 checkpoint", [*ours, "--model", str(args.int8), text] if args.int8 else None),
            ("gemma3n int4 checkpoint", [*ours, "--model", str(args.int4), text] if args.int4 else None),
            ("gemma3n bf16 + --quantize int4", [*ours, "--model", str(args.bf16), "--quantize", "int4", text]),
            ("transformers bf16", None if args.skip_transformers else
             [args.peer_python, "-c", TRANSFORMERS_CHILD, str(args.bf16), json.dumps(ids)])]
    runs += [(f"gemma3n {label}", [*ours, "--model", folder, text])
             for label, _, folder in (extra.partition("=") for extra in args.extra)]
    for name, command in runs:
        if command is None:
            continue
        rows[name] = run_child(command)
        print(f"{name:34s} {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "memory", "checkpoint": "random weights, Gemma 3n E2B shape", "rows": rows,
                      "prompt_tokens": 128, "new_tokens": NEW_TOKENS, "torch": torch.__version__,
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus", "threads": torch.get_num_threads(),
                      "note": "timings distorted by other jobs sharing the 2 CPU cores; RSS is the point"}))


if __name__ == "__main__":
    main()
