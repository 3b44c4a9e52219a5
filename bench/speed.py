"""Question: how fast do gemma3n, llama.cpp and transformers prefill and decode the same model on this CPU, and how
close does each decode come to the machine's memory bandwidth?

Default model: the real Gemma 3 270M Q4_K_M GGUF, loaded by all three (gemma3n as `gemma3n.load(gguf)` loads it,
llama.cpp natively through llama-cpp-python with its quantised kernels, transformers dequantised to float32).
`--hf-folder DIR` adds a Hugging Face checkpoint (e.g. the E2B-shape one) for gemma3n and transformers; llama.cpp
would need its converter and quantiser run on that folder first, which this script does not do.

Each trial, per engine: a 128- and a 512-token prompt are prefilled (time to first token = the 128-token prefill
plus the head and the argmax that picks the first token), then 64 tokens are decoded greedily after the 128-token
prompt. Engines are alternated inside every trial so machine load falls on all alike; one warm-up trial, then the
median of --trials. Achieved decode bandwidth = bytes of weights each engine reads per token / time per token,
set beside a 2-thread read of a large float32 array. The last line printed is one JSON object.
Run: python bench/speed.py [--trials 5] [--threads 2] [--also-bf16] [--ours-quantize int8,int4]
     [--hf-folder /work/e2b] [--skip transformers,llama.cpp]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

# Measure the gemma3n of the checkout this script is in, not whichever one is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT_LENGTHS = (128, 512)
DECODE_TOKENS = 64


def prompt_ids(length: int, vocab: int) -> list[int]:
    """A fixed pseudo-random prompt: BOS then ids drawn from the common part of the vocabulary."""
    g = torch.Generator().manual_seed(length)
    return [2] + torch.randint(1000, min(vocab, 200_000), (length - 1,), generator=g).tolist()


class ReadBandwidth:
    """GB/s of a plain summing read (torch, the benchmark's threads) over a 1 GiB float32 array, far larger than
    the caches. Sampled once per round like an engine, so it sees the same machine load."""

    name = "read"

    def __init__(self, gib: float = 1.0):
        self.x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        self.x.sum()

    def sample(self, reads: int = 3) -> float:
        times = []
        for _ in range(reads):
            t0 = time.perf_counter()
            self.x.sum()
            times.append(time.perf_counter() - t0)
        return self.x.numel() * 4 / min(times) / 1e9


class Ours:
    def __init__(self, path: Path, dtype, name: str = "gemma3n", quantize: str | None = None):
        import gemma3n
        self.name = name
        extra = {"quantize": quantize} if quantize else {}  # only where the checkout has quantisation
        self.model = gemma3n.load(path, dtype=dtype, **extra)
        self.lm = self.model.lm
        self.vocab = self.lm.config.vocab_size
        self.weight_bytes = decode_bytes_torch(self.lm)

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            cache = self.lm.new_cache(1, len(ids) + DECODE_TOKENS + 1)
            t0 = time.perf_counter()
            self.lm(torch.tensor([ids]), None, cache, last_only=True)[:, -1].argmax(-1)
            return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            cache = self.lm.new_cache(1, len(ids) + n + 1)
            nxt = self.lm(torch.tensor([ids]), None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            out, t0 = [], time.perf_counter()
            for _ in range(n):
                nxt = self.lm(nxt, None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
                out.append(int(nxt))
            return time.perf_counter() - t0, out


class Transformers:
    name = "transformers"

    def __init__(self, path: Path, dtype):
        from transformers import AutoModelForCausalLM
        if path.is_dir():
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        else:  # transformers dequantises a GGUF to float32, its only way to load one
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
        self.model.eval()
        self.vocab = self.model.config.get_text_config().vocab_size
        self.weight_bytes = decode_bytes_torch(self.model)

    def prefill(self, ids: list[int]) -> float:
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
            return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            out = self.model(torch.tensor([ids]), use_cache=True, logits_to_keep=1)
            past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            toks, t0 = [], time.perf_counter()
            for _ in range(n):
                out = self.model(nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(int(nxt))
            return time.perf_counter() - t0, toks


class LlamaCpp:
    name = "llama.cpp"

    def __init__(self, path: Path, threads: int):
        import llama_cpp
        without_extra_buffers()
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.weight_bytes = decode_bytes_gguf(path)

    def _next(self) -> int:
        logits = np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(logits.argmax())

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        self._next()
        return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        self.llm.reset()
        self.llm.eval(ids)
        nxt, toks, t0 = self._next(), [], time.perf_counter()
        for _ in range(n):
            self.llm.eval([nxt])
            nxt = self._next()
            toks.append(nxt)
        return time.perf_counter() - t0, toks


def without_extra_buffers() -> None:
    """Load llama.cpp models without its "extra" CPU buffer types (AMX / repacked weights): on this machine the
    AMX matmul (ggml_backend_amx_mul_mat) segfaults on the first decode, as gdb shows. Plain ggml CPU kernels
    remain (AVX-512 / VNNI quantised dot products)."""
    import llama_cpp.llama_cpp as low
    if getattr(low.llama_model_default_params, "_no_extra", False):
        return
    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p
    params._no_extra = True
    low.llama_model_default_params = params


def decode_bytes_torch(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (the tied embedding counted once, as
    the head reads all of it; quantised weights live in buffers; the RoPE frequency buffers add a few bytes)."""
    seen, total = set(), 0
    for p in [*model.parameters(), *model.buffers()]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_bytes_gguf(path: Path) -> int:
    """Bytes of the GGUF's tensors as stored (llama.cpp reads them in place, quantised)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def run_trials(engines, trials: int) -> dict:
    """Warm-up, then `trials` rounds; in each round every engine runs every measurement in turn."""
    samples = {e.name: {"prefill": {n: [] for n in PROMPT_LENGTHS}, "decode": []} for e in engines}
    samples["bandwidth"], reader = [], ReadBandwidth()
    prompts = {n: prompt_ids(n, min(e.vocab for e in engines)) for n in PROMPT_LENGTHS}
    for round_ in range(trials + 1):
        order = engines if round_ % 2 == 0 else engines[::-1]
        if round_:
            samples["bandwidth"].append(reader.sample())
        for e in order:
            for n in PROMPT_LENGTHS:
                t = e.prefill(prompts[n])
                if round_:
                    samples[e.name]["prefill"][n].append(t)
            t, toks = e.decode(prompts[PROMPT_LENGTHS[0]], DECODE_TOKENS)
            if round_:
                samples[e.name]["decode"].append(t)
            print(f"round {round_} {e.name}: decode {DECODE_TOKENS / t:.1f} tok/s, first tokens {toks[:6]}",
                  flush=True)
    return samples


def summarise(engines, samples) -> dict:
    bandwidth = statistics.median(samples["bandwidth"])
    row = {"read_bandwidth_gb_s": round(bandwidth, 1)}
    for e in engines:
        s = samples[e.name]
        decode_s = statistics.median(s["decode"]) / DECODE_TOKENS
        for n in PROMPT_LENGTHS:
            row[f"{e.name}_prefill{n}_tok_s"] = round(n / statistics.median(s["prefill"][n]), 1)
        row[f"{e.name}_ttft128_ms"] = round(1000 * statistics.median(s["prefill"][PROMPT_LENGTHS[0]]), 1)
        row[f"{e.name}_decode_tok_s"] = round(1 / decode_s, 2)
        row[f"{e.name}_weight_mb_per_token"] = round(e.weight_bytes / 1e6, 1)
        row[f"{e.name}_decode_gb_s"] = round(e.weight_bytes / decode_s / 1e9, 2)
        row[f"{e.name}_decode_bandwidth_fraction"] = round(e.weight_bytes / decode_s / 1e9 / bandwidth, 3)
    if "gemma3n" in samples:
        for e in engines:
            if not e.name.startswith("gemma3n"):  # peers only, not our own variants
                row[f"decode_ratio_vs_{e.name}"] = round(row["gemma3n_decode_tok_s"] / row[f"{e.name}_decode_tok_s"], 2)
                row[f"prefill128_ratio_vs_{e.name}"] = round(
                    row["gemma3n_prefill128_tok_s"] / row[f"{e.name}_prefill128_tok_s"], 2)
    return row


def bench_model(label: str, path: Path, args, with_llama: bool, dtype) -> dict:
    engines = [Ours(path, dtype)]
    if args.also_bf16 and dtype is None:  # our loader's dtype option: results change (bf16 rounding), bytes halve
        engines.append(Ours(path, torch.bfloat16, name="gemma3n-bf16"))
    for scheme in filter(None, args.ours_quantize.split(",")):
        engines.append(Ours(path, dtype, name=f"gemma3n-{scheme}", quantize=scheme))
    if with_llama and "llama.cpp" not in args.skip:
        engines.append(LlamaCpp(path, args.threads))
    if "transformers" not in args.skip:
        engines.append(Transformers(path, dtype))
    samples = run_trials(engines, args.trials)
    row = {"model": label, "dtype": str(dtype or "as stored")}
    row.update(summarise(engines, samples))
    return row


def main(args) -> None:
    from gemma3n.cli import default_model_path
    torch.set_num_threads(args.threads)
    gguf_path = default_model_path()
    rows = [bench_model(f"{gguf_path.name} (gemma3n/transformers dequantise to float32)", gguf_path, args,
                        with_llama=True, dtype=None)]
    if args.hf_folder:
        rows.append(bench_model(f"{args.hf_folder} ({args.hf_dtype}; llama.cpp skipped: needs its converter)",
                                Path(args.hf_folder), args, with_llama=False, dtype=getattr(torch, args.hf_dtype)))
    import transformers
    load = os.getloadavg()
    try:
        import llama_cpp
        llama_version = llama_cpp.__version__
    except ImportError:
        llama_version = None
    print(json.dumps({
        "bench": "speed", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "threads": args.threads, "load_average_at_end": [round(x, 2) for x in load], "torch": torch.__version__,
        "transformers": transformers.__version__, "llama_cpp_python": llama_version, "trials": args.trials,
        "prompt_tokens": list(PROMPT_LENGTHS), "decode_tokens": DECODE_TOKENS,
        "rows": rows,
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--hf-folder", help="a Hugging Face checkpoint folder to add (gemma3n and transformers)")
    parser.add_argument("--hf-dtype", default="bfloat16", help="dtype both engines load --hf-folder in")
    parser.add_argument("--also-bf16", action="store_true",
                        help="add gemma3n loading the GGUF as bfloat16 (load(path, dtype='bfloat16'))")
    parser.add_argument("--ours-quantize", default="",
                        help="comma-separated quantize= schemes to add as gemma3n variants (e.g. int8,int4)")
    parser.add_argument("--skip", default="", help="comma-separated peers to leave out: transformers,llama.cpp")
    main(parser.parse_args())
