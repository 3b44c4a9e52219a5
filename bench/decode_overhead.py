"""Question: what does one decode step cost apart from the Linear layers' matmuls (norms, RoPE, masks, cache
writes, attention for one query, AltUp, stream stacking, Python work per layer)?

Two models, batch 1, one new token per step with the KV cache after a 128-token prompt, float32:
- `270m`: the real Gemma 3 270M (the packaged Q4_K_M GGUF dequantised to float32);
- `e2b-narrow`: a random-weight Gemma 3n with E2B's layer structure (30 layers, 4 AltUp streams, head_dim 256,
  8 heads / 2 KV heads, 10 KV-shared and 10 sparse layers, sliding 4:1) but hidden 256 / intermediate 1024 /
  vocab 4096, so that its matmuls are negligible and the step time is the overhead.

Per model: warm-up, then the median step time over `--steps` steps, repeated `--trials` times (median of trial
medians), and the number of profiler events (aten ops) of one step. The last line printed is one JSON object.
Run: python bench/decode_overhead.py [--models 270m,e2b-narrow] [--steps 64] [--trials 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

PROMPT = 128


def e2b_narrow():
    from gemma3n.config import TextConfig
    from gemma3n.model.text import CausalLM, enable_sparse_decode
    cfg = TextConfig.from_dict(dict(
        vocab_size=4096, vocab_size_per_layer_input=4096, hidden_size=256, num_hidden_layers=30,
        intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=256,
        hidden_size_per_layer_input=256, laurel_rank=64, altup_num_inputs=4, sliding_window=512,
        num_kv_shared_layers=10, max_position_embeddings=4096,
        layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 6,
        activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20, final_logit_softcapping=30.0))
    torch.manual_seed(0)
    lm = CausalLM(cfg).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.copy_(torch.randn(p.shape) * (1.0 if p.dim() == 1 else p.shape[-1] ** -0.5))
    enable_sparse_decode(lm)
    return lm


def real_270m():
    import gemma3n
    from gemma3n.cli import default_model_path
    return gemma3n.load(default_model_path()).lm


def decode_steps(lm, steps: int):
    """A cache holding a 128-token prompt, and a function running one decode step on it."""
    g = torch.Generator().manual_seed(0)
    vocab = lm.config.vocab_size
    prompt = torch.randint(3, vocab, (1, PROMPT), generator=g)
    with torch.inference_mode():
        cache = lm.new_cache(1, PROMPT + steps + 8)
        logits = lm(prompt, None, cache, last_only=True)
    state = {"next": logits[:, -1].argmax(-1, keepdim=True)}

    def step():
        with torch.inference_mode():
            out = lm(state["next"], None, cache, last_only=True)
        state["next"] = out[:, -1].argmax(-1, keepdim=True)
    return step


def time_model(lm, steps: int, trials: int) -> tuple[float, list[float]]:
    medians = []
    for _ in range(trials + 1):  # the first trial warms up
        step = decode_steps(lm, steps)
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        medians.append(statistics.median(times))
    return statistics.median(medians[1:]), medians[1:]


def count_ops(lm) -> int:
    step = decode_steps(lm, 4)
    step()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    # top-level aten ops only (an op called by another op is not counted again)
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and
               (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="270m,e2b-narrow")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    row = {"bench": "decode_overhead", "torch": torch.__version__, "threads": args.threads,
           "cpu": platform.processor() or platform.machine(), "prompt_tokens": PROMPT, "dtype": "float32"}
    for name in args.models.split(","):
        lm = {"270m": real_270m, "e2b-narrow": e2b_narrow}[name]()
        med, trial_meds = time_model(lm, args.steps, args.trials)
        row[f"{name}_step_ms"] = round(med * 1e3, 3)
        row[f"{name}_trial_ms"] = [round(m * 1e3, 3) for m in trial_meds]
        row[f"{name}_ops"] = count_ops(lm)
        print(name, row[f"{name}_step_ms"], "ms", row[f"{name}_ops"], "ops", flush=True)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
