"""Decode speed and peak memory: gemma3n's own engine (torch) beside gemma3n running the same model's ONNX export
with onnxruntime, each in its own process, alternating, same prompt, greedy.

    PYTHONPATH=. python bench/onnx_decode.py --make /tmp/g3n-mid            # once: a random Gemma 3n (transformers)
    gemma3n export onnx /tmp/g3n-mid /tmp/g3n-mid-onnx --dtype fp32,q8,q4    # the export (its time is printed)
    PYTHONPATH=. python bench/onnx_decode.py /tmp/g3n-mid /tmp/g3n-mid-onnx --dtypes fp32,q8,q4 --trials 3
    PYTHONPATH=. python bench/onnx_decode.py /work/e2b /work/onnx-e2b --dtypes q4 --torch torch,torch-int4

Decode tok/s = (N - 1) / (time of N new tokens - time of 1 new token), so the prefill is left out; CPU seconds
are reported beside wall seconds because the machine's cores are shared. The stop ids are switched off (random
weights may pick one), so every run decodes exactly N tokens. Prints each run on stderr and one JSON line last."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, torch
import gemma3n
path, variant, new = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(2)
started = time.perf_counter()
if variant.startswith("torch"):  # torch = as stored; torch-int8 / torch-int4 = gemma3n's weight-only quantisation
    model = gemma3n.load(path, quantize=variant.partition("-")[2] or None)
else:
    model = gemma3n.load(path, onnx_dtype=variant)
load_s = time.perf_counter() - started
model.stop_ids = lambda: set()  # random weights may pick an end id: every run decodes exactly N tokens
ids = torch.arange(3, 35)[None]
model.generate(ids, max_new_tokens=2, temperature=0)  # warm-up
def timed(n):
    w, c = time.perf_counter(), time.process_time()
    out = model.generate(ids, max_new_tokens=n, temperature=0)
    assert out.shape[1] == n, out.shape
    return time.perf_counter() - w, time.process_time() - c
w1, c1 = timed(1)
wn, cn = timed(new)
print(json.dumps({"tok_s": (new - 1) / (wn - w1), "cpu_s_per_tok": (cn - c1) / (new - 1), "load_s": load_s,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_checkpoint(folder: Path) -> None:
    """A random text-only Gemma 3n of mid size (E2B's head and KV layout, fewer and narrower layers)."""
    import torch
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.finetune.tiny_data import write_turn_tokenizer
    torch.manual_seed(0)
    cfg = Gemma3nTextConfig(vocab_size=16384, vocab_size_per_layer_input=16384, hidden_size=1024,
                            hidden_size_per_layer_input=128, intermediate_size=4096, num_hidden_layers=10,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=256, num_kv_shared_layers=4,
                            sliding_window=512, laurel_rank=64, max_position_embeddings=4096,
                            activation_sparsity_pattern=[0.95] * 5 + [0.0] * 5)
    model = Gemma3nForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    write_turn_tokenizer(folder, vocab_size=16384)


def run(path: Path, variant: str, new: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), variant, str(new)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} on {path} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps({"variant": variant, **result}), file=sys.stderr, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("onnx", type=Path, nargs="?")
    parser.add_argument("--make", action="store_true", help="write the random mid-size checkpoint and stop")
    parser.add_argument("--dtypes", default="fp32,q8,q4", help="ONNX dtypes to run (onnxruntime)")
    parser.add_argument("--torch", default="torch", help="gemma3n engine variants: torch (as stored), torch-int8, "
                                                         "torch-int4; comma-separated")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=33)
    args = parser.parse_args()
    if args.make:
        make_checkpoint(args.checkpoint)
        return
    torch_variants = [v for v in args.torch.split(",") if v]
    runs = {**{v: [] for v in torch_variants}, **{d: [] for d in args.dtypes.split(",") if d}}
    load_before = os.getloadavg()
    for _ in range(args.trials):  # alternating: every runtime sees the same load on the shared cores
        for name in runs:
            runs[name].append(run(args.checkpoint if name.startswith("torch") else args.onnx, name, args.new_tokens))
    summary = {name: {key: round(statistics.median(r[key] for r in rows), 3) for key in rows[0]}
               for name, rows in runs.items()}
    suffixes = {"fp32": "", "fp16": "_fp16", "q8": "_quantized", "q4": "_q4", "q4f16": "_q4f16"}
    sizes = {d: sum(f.stat().st_size for name in ("embed_tokens", "decoder_model_merged")
                    for f in (args.onnx / "onnx").glob(f"{name}{suffixes[d]}.onnx*")
                    if f.name in (f"{name}{suffixes[d]}.onnx", f"{name}{suffixes[d]}.onnx_data")) / 2 ** 20
             for d in args.dtypes.split(",") if d}
    print(json.dumps({"trials": args.trials, "new_tokens": args.new_tokens, "median": summary,
                      "text_sessions_mib": {d: round(v, 1) for d, v in sizes.items()},
                      "loadavg_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
