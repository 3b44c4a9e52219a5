"""Question: where does a decode step's time go, now that the layers run as one native call?

For each model: a 128-token prompt, then `--steps` greedy decode steps (run twice, the second measured) (batch 1, the benchmark's threads), each
split into
- the native call (model/native_decode.py), by its own counters: the attention projections (q, k, v, o), the MLP
  products (gate, up, down, with the sparse layers' skips), AltUp / LAuReL / per-layer-input products, attention
  over the cache, and the rest of the call (norms, RoPE, activations, AltUp mixing: float32 vector work);
- the LM head (the tied embedding product over the whole vocabulary and the soft-cap);
- everything else in PyTorch: embeddings, per-layer inputs, the AltUp stream set-up and collapse, cache
  bookkeeping, the final norm, the argmax.
Medians over the steps, in ms, and what they read: the weights' bytes per token over the step time, against this
machine's plain read bandwidth (measured here the same way bench/speed.py does). The last line is one JSON object.

Run: python bench/decode_profile.py [--model PATH ...] [--steps 32] [--threads 2]
(default: the packaged Gemma 3 270M Q4_K_M GGUF)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from speed import ReadBandwidth, decode_bytes_torch, prompt_ids  # noqa: E402

PROMPT = 128


def profile_model(path: str, steps: int) -> dict:
    import gemma3n
    from gemma3n.model import native_decode
    model = gemma3n.load(path)
    lm = model.lm
    head_times: list[float] = []
    plain_head = lm.head

    def timed_head(hidden):
        t0 = time.perf_counter()
        out = plain_head(hidden)
        head_times.append(time.perf_counter() - t0)
        return out
    lm.head = timed_head
    ids = prompt_ids(PROMPT, lm.config.vocab_size)
    for _ in range(2):  # the first pass warms up (caches, page cache); the second, the same tokens, is measured
        rows = _profile_pass(lm, ids, steps, head_times, native_decode)
    weight_bytes = decode_bytes_torch(lm)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"model": str(path), "ms": {k: round(v * 1e3, 2) for k, v in med.items()},
            "tokens_per_s": round(1 / med["step"], 2), "weight_bytes_per_token": weight_bytes,
            "weight_GBps": round(weight_bytes / med["step"] / 1e9, 2)}


def _profile_pass(lm, ids: list[int], steps: int, head_times: list[float], native_decode) -> list[dict]:
    rows: list[dict] = []
    with torch.inference_mode():
        cache = lm.new_cache(1, PROMPT + steps + 2)
        nxt = lm(torch.tensor([ids]), None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
        for i in range(steps + 1):
            decoder = getattr(cache, "native_decoder", (None, None))[1]
            if decoder is not None:
                decoder.profile = torch.zeros(len(native_decode.PROFILE), dtype=torch.float64)
            head_times.clear()
            t0 = time.perf_counter()
            nxt = lm(nxt, None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            step = time.perf_counter() - t0
            decoder = cache.native_decoder[1]
            if decoder is None:
                raise SystemExit("the native decode step does not apply to this model")
            if i == 0:
                continue  # the first step builds the native description
            p = decoder.profile.tolist()
            native = p[-1]
            row = {name: p[j] for j, name in enumerate(native_decode.PROFILE[:-1])}
            row["rest of the native call"] = native - sum(p[:-1])
            row["LM head"] = head_times[0]
            row["other PyTorch work"] = step - native - head_times[0]
            row["step"] = step
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="checkpoint folder or GGUF (repeatable)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.model:
        from gemma3n.cli import default_model_path
        args.model = [default_model_path()]
    reader = ReadBandwidth()
    results = []
    for path in args.model:
        r = profile_model(path, args.steps)
        r["read_GBps"] = round(reader.sample(), 2)
        r["bandwidth_share"] = round(r["weight_GBps"] / r["read_GBps"], 3)
        results.append(r)
        print(f"\n{path}: {r['tokens_per_s']} tok/s, {r['weight_GBps']} GB/s of weights "
              f"({100 * r['bandwidth_share']:.0f}% of {r['read_GBps']} GB/s read bandwidth)")
        for k, v in r["ms"].items():
            print(f"  {k:34s} {v:8.2f} ms")
    print(json.dumps({"threads": args.threads, "steps": args.steps, "results": results}))


if __name__ == "__main__":
    main()
