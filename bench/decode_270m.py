"""Question: how fast does the real Gemma 3 270M (Q4_K_M GGUF) decode on this CPU, in gemma3n and in
transformers, measured in the same run?

Both load the same GGUF, dequantised to float32 (transformers' only way to load a GGUF). Each trial: a fixed
prompt, greedy, N new tokens with the KV cache; we time prefill and decode separately. Warm-up first, then the
median of TRIALS trials. The last line printed is one JSON object.
Run: python bench/decode_270m.py [--new-tokens 64] [--trials 5]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

PROMPT_IDS = [2, 818, 5279, 529, 7001, 563, 496, 1979, 529, 1852, 532, 11211, 236764, 1015, 691, 1401]


def time_ours(path, prompt, new_tokens: int) -> tuple[float, float]:
    import gemma3n
    model = gemma3n.load(path)
    lm = model.lm

    def trial():
        with torch.inference_mode():
            cache = lm.new_cache(1, prompt.shape[1] + new_tokens)
            t0 = time.perf_counter()
            logits = lm(prompt, None, cache, last_only=True)
            t1 = time.perf_counter()
            for _ in range(new_tokens - 1):
                logits = lm(logits[:, -1].argmax(-1, keepdim=True), None, cache, last_only=True)
            return t1 - t0, time.perf_counter() - t1
    return run_trials(trial, new_tokens)


def time_transformers(path, prompt, new_tokens: int) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()

    def trial():
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(prompt, use_cache=True)
            t1 = time.perf_counter()
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            for _ in range(new_tokens - 1):
                out = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return t1 - t0, time.perf_counter() - t1
    return run_trials(trial, new_tokens)


def run_trials(trial, new_tokens: int) -> tuple[float, float]:
    trial()  # warm-up
    results = [trial() for _ in range(ARGS.trials)]
    prefill = statistics.median(r[0] for r in results)
    decode = statistics.median(r[1] for r in results)
    return prefill, (new_tokens - 1) / decode


def main() -> None:
    from gemma3n.cli import default_model_path
    path = default_model_path()
    prompt = torch.tensor([PROMPT_IDS])
    ours_prefill, ours_rate = time_ours(path, prompt, ARGS.new_tokens)
    ref_prefill, ref_rate = time_transformers(path, prompt, ARGS.new_tokens)
    import transformers
    row = {
        "bench": "decode_270m", "model": path.name, "dtype": "float32 (dequantised Q4_K_M)",
        "prompt_tokens": prompt.shape[1], "new_tokens": ARGS.new_tokens, "trials": ARGS.trials,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gemma3n_decode_tok_s": round(ours_rate, 2), "transformers_decode_tok_s": round(ref_rate, 2),
        "gemma3n_prefill_s": round(ours_prefill, 4), "transformers_prefill_s": round(ref_prefill, 4),
        "decode_ratio_vs_transformers": round(ours_rate / ref_rate, 2),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--trials", type=int, default=5)
    ARGS = parser.parse_args()
    main()
