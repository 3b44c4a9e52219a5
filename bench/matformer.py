"""MatFormer, elastic vs offline: E4B-shape checkpoint -> its E2B slice, loaded from the E4B files at load time
(`--matformer E2B`) and from the folder `gemma3n slice` wrote; peak RSS, load time and decode speed of `gemma3n run`,
each in its own process, alternated, in one run. Also the slicing itself (time and peak RSS of `gemma3n slice`).

    python bench/make_e2b_checkpoint.py /work/e4b --shape e4b          # once: random weights, E4B shape, ~15.7 GB
    python bench/matformer.py --e4b /work/e4b --slice /work/e4b-e2b    # writes the slice first if it is missing

Text prompt of 128 tokens, 32 new tokens, greedy (bench/memory.py's prompt and measurement). The JSON line printed
last holds every row; a row's figures are the medians over --trials.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import NEW_TOKENS, ROOT, prompt_of, run_child  # noqa: E402


def make_slice(python: str, e4b: Path, dst: Path, config: str) -> dict:
    start = time.perf_counter()
    child = subprocess.Popen([python, "-m", "gemma3n.cli", "slice", str(e4b), str(dst), "--config", config],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gemma3n slice failed (exit {os.waitstatus_to_exitcode(status)})")
    summary = json.loads(out)
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3),
            "bytes": summary["bytes"], "parameters": summary["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--e4b", type=Path, required=True, help="the E4B-shape bf16 checkpoint folder")
    parser.add_argument("--slice", type=Path, required=True, help="its slice folder (written first if missing)")
    parser.add_argument("--config", default="E2B", help="the MatFormer configuration (default E2B)")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--quantize", help="also rows with --quantize SCHEME at load (e.g. int4)")
    parser.add_argument("--no-bf16", action="store_true", help="only the --quantize rows")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the gemma3n rows")
    args = parser.parse_args()
    sliced = None
    if not args.slice.exists():
        sliced = make_slice(args.python, args.e4b, args.slice, args.config)
        print(f"slice written: {json.dumps(sliced)}", file=sys.stderr, flush=True)
    text, _ = prompt_of(args.e4b, 128)
    ours = [args.python, "-m", "gemma3n.cli", "run", "--json", "--temperature", "0", "--max-new-tokens",
            str(NEW_TOKENS)]
    runs = {} if args.no_bf16 else {
        f"elastic: E4B files, --matformer {args.config}": [*ours, "--model", str(args.e4b), "--matformer", args.config,
                                                           text],
        "offline: the sliced folder": [*ours, "--model", str(args.slice), text]}
    if args.quantize:
        runs[f"elastic + --quantize {args.quantize}"] = [*ours, "--model", str(args.e4b), "--matformer", args.config,
                                                         "--quantize", args.quantize, text]
        runs[f"offline + --quantize {args.quantize}"] = [*ours, "--model", str(args.slice), "--quantize",
                                                         args.quantize, text]
    trials: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(args.trials):
        for name, command in runs.items():  # alternated, so a busy moment does not fall on one row only
            trials[name].append(run_child(command))
            print(f"{name:40s} {json.dumps(trials[name][-1])}", file=sys.stderr, flush=True)
    rows = {name: {key: statistics.median(t[key] for t in got) for key in ("peak_rss_gib", "load_seconds",
                                                                           "decode_tokens_per_second")}
            for name, got in trials.items()}
    print(json.dumps({"benchmark": "matformer", "checkpoint": "random weights, Gemma 3n E4B shape",
                      "config": args.config, "slice": sliced, "rows": rows, "trials": args.trials,
                      "prompt_tokens": 128, "new_tokens": NEW_TOKENS, "torch": torch.__version__,
                      "machine": f"{platform.machine()} {os.cpu_count()} cpus",
                      "load_average": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
