"""Question: how fast do gemma3n, llama.cpp and transformers prefill and decode the same model on this CPU, and how
close does each decode come to the machine's memory bandwidth? On the real Gemma 3 270M and on the Gemma 3n E2B
shape, peers measured in the same run.

270M row: the real Gemma 3 270M Q4_K_M GGUF, loaded by all three (gemma3n as `gemma3n.load(gguf)` loads it,
llama.cpp natively through llama-cpp-python with its quantised kernels, transformers dequantised to float32).

E2B rows (random weights of the exact E2B shape, see bench/make_e2b_checkpoint.py and bench/make_e2b_gguf.py):
`--e2b-hf DIR` is the bf16 Hugging Face folder, loaded as stored by gemma3n and by transformers (bf16);
`--e2b-ours PATH` (repeatable, `LABEL=PATH` to name it) adds gemma3n loading a quantised folder written by
`gemma3n quantize` or a GGUF, each as stored; `--e2b-gguf FILE` is the GGUF llama.cpp's own converter and quantiser
made of the same folder (bench/make_e2b_gguf.py), run by llama.cpp. To keep the resident set within 24 GiB the E2B
engines are loaded one group at a time and freed after it: the bf16 group (gemma3n and transformers on --e2b-hf),
then the quantised group (the --e2b-ours variants and llama.cpp); engines are alternated only within a group, so
ratios across groups (e.g. gemma3n bf16 vs llama.cpp) were measured minutes apart. --e2b-one-group loads them all
at once. Bytes read per decoded token leave out the per-layer embedding table (a decode step gathers one 7680-wide
row of it, not the 262144-row table) and the vision/audio towers; they count every other weight once, as a dense
decode reads it (the tied embedding once, as the head reads all of it).

Each trial, per engine: a 128- and a 512-token prompt are prefilled (time to first token = the 128-token prefill
plus the head and the argmax that picks the first token), then 64 tokens are decoded greedily after the 128-token
prompt. Each engine picks the greedy token as its users' code does: gemma3n with its generation's own choice
(engine.sampling.greedy), llama.cpp's row with numpy's argmax over the logits it returns, transformers with
torch's argmax (its generate). Engines are alternated inside every trial so machine load falls on all alike;
one warm-up trial, then the median of --trials. Achieved decode bandwidth = bytes of weights each engine reads
per token / time per token, set beside a 2-thread read of a large float32 array. The last line printed is one
JSON object; `ratios` holds, for every gemma3n variant and every peer of the same row, gemma3n / peer for decode
and both prefills.
--quick: a smoke run, not a measurement: one trial of 16- and 32-token prompts and 8 decoded tokens after a
light warm-up (keys then say prefill16 / prefill32 / ttft16).

llama.cpp is llama-cpp-python 0.3.36, not a dependency; installed from the PyPI sdist, which builds the llama.cpp
it vendors for this CPU (a few minutes on 2 cores):
    CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
It runs at its defaults, "extra" buffer types on (its repacked, interleaved weight layouts: on AVX2 machines its
fastest Q4 kernels). Only where a probe process shows that the defaults crash on this machine (an AMX matrix product
once segfaulted on one) is it loaded with use_extra_bufts=False, and its row says so (`--llama-no-extra` forces it).
Every engine's row states its version and flags (`<engine>_version`, `<engine>_flags`), beside the machine's read
bandwidth measured in the same rounds. gemma3n runs its default, exact float32 activations; `--also-int8` adds
gemma3n with the opt-in int8 activations (the setting is switched before each of its measurements), for the 270M
and for each `--e2b-ours` checkpoint.

Run (270M only):  python bench/speed.py [--trials 5] [--threads 2] [--also-bf16] [--also-int8]
                  [--ours-quantize int8,int4] [--skip transformers,llama.cpp] [--llama-no-extra]
Run (with E2B):   python bench/speed.py --e2b-hf /work/e2b --e2b-ours /work/e2b-int4 --e2b-ours /work/e2b-Q4_K_M.gguf \
                  --e2b-gguf /work/e2b-Q4_K_M.gguf [--no-270m] [--e2b-skip transformers,llama.cpp,gemma3n-bf16]
Smoke:            the same with --quick
"""
from __future__ import annotations

import argparse
import gc
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
QUICK_LENGTHS, QUICK_DECODE = (16, 32), 8  # --quick: a smoke run's prompts and decoded tokens (keys say so)
# not read whole per decoded token: the per-layer table (one row gathered per token) and the towers
NOT_READ_PER_TOKEN = ("embed_tokens_per_layer", "per_layer_token_embd", "vision_tower", "audio_tower",
                      "embed_vision", "embed_audio")


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


def _git_revision() -> str:
    import subprocess
    done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


class Ours:
    def __init__(self, path: Path, dtype=None, name: str = "gemma3n", quantize: str | None = None,
                 activations: str = "float32"):
        import gemma3n
        from gemma3n import kernels
        self.name, self.activations, self.kernels = name, activations, kernels
        try:  # the token choice gemma3n's own generation makes (older checkouts: torch's argmax)
            from gemma3n.engine.sampling import greedy
        except ImportError:
            def greedy(scores):
                return scores.argmax(-1)
        self.greedy = greedy
        extra = {"quantize": quantize} if quantize else {}  # only where the checkout has quantisation
        self.model = gemma3n.load(path, dtype=dtype, **extra)
        self.lm = self.model.lm
        self.vocab = self.lm.config.vocab_size
        self.weight_bytes = decode_bytes_torch(self.lm)
        self.version = f"gemma3n {_git_revision()}, torch {torch.__version__}"
        self.flags = (f"activations={activations}, dtype={dtype or 'as stored'}, quantize={quantize}, "
                      f"native kernels {'on' if kernels.native() is not None else 'off: ' + str(kernels.why_not())}")

    def prefill(self, ids: list[int]) -> float:
        self.kernels.set_activation_precision(self.activations)  # process-wide: set before each measurement
        with torch.inference_mode():
            cache = self.lm.new_cache(1, len(ids) + DECODE_TOKENS + 1)
            t0 = time.perf_counter()
            self.greedy(self.lm(torch.tensor([ids]), None, cache, last_only=True)[:, -1])
            return time.perf_counter() - t0

    def decode(self, ids: list[int], n: int) -> tuple[float, list[int]]:
        self.kernels.set_activation_precision(self.activations)
        with torch.inference_mode():
            cache = self.lm.new_cache(1, len(ids) + n + 1)
            nxt = self.greedy(self.lm(torch.tensor([ids]), None, cache, last_only=True)[:, -1])[:, None]
            out, t0 = [], time.perf_counter()
            for _ in range(n):
                nxt = self.greedy(self.lm(nxt, None, cache, last_only=True)[:, -1])[:, None]
                out.append(int(nxt))
            return time.perf_counter() - t0, out


class Transformers:
    def __init__(self, path: Path, dtype, name: str = "transformers"):
        self.name = name
        from transformers import AutoModelForCausalLM
        if path.is_dir():
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto")
        else:  # transformers dequantises a GGUF to float32, its only way to load one
            self.model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
        self.model.eval()
        self.vocab = self.model.config.get_text_config().vocab_size
        self.weight_bytes = decode_bytes_torch(self.model)
        import transformers
        self.version = f"transformers {transformers.__version__}, torch {torch.__version__}"
        self.flags = f"dtype={self.model.dtype}" + ("" if path.is_dir() else " (GGUF dequantised at load)")

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
    def __init__(self, path: Path, threads: int, name: str = "llama.cpp", no_extra: bool = False):
        import llama_cpp
        self.name = name
        crash = None if no_extra else defaults_crash(path, threads)
        if no_extra or crash:
            without_extra_buffers()
            self.flags = "use_extra_bufts=False (" + (crash or "forced by --llama-no-extra") + ")"
        else:
            self.flags = "defaults (extra / repacked CPU buffer types on)"
        self.flags += f", n_threads={threads}, n_batch=512"
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.weight_bytes = decode_bytes_gguf(path)
        info = llama_cpp.llama_print_system_info()
        info = info.decode() if isinstance(info, bytes) else str(info)
        self.version = f"llama-cpp-python {llama_cpp.__version__} ({info.strip()})"

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

    def close(self) -> None:
        self.llm.close()


def defaults_crash(path: Path, threads: int) -> str | None:
    """Whether llama.cpp at its defaults dies on this machine: a child process loads `path` and decodes a few tokens
    (a crash there cannot take the benchmark down). None when it runs; otherwise what happened."""
    import signal
    import subprocess
    code = ("import llama_cpp; llm = llama_cpp.Llama(model_path=%r, n_ctx=256, n_batch=64, n_threads=%d, "
            "verbose=False); llm.eval(list(range(2, 40))); [llm.eval([7]) for _ in range(4)]" % (str(path), threads))
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "the defaults hung for 10 min in a probe process"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return f"the defaults crashed here: {signal.Signals(-done.returncode).name} in a probe process"
    return f"the defaults failed here: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}"


def without_extra_buffers() -> None:
    """Load llama.cpp models without its "extra" CPU buffer types (AMX / repacked weights): the fallback where the
    defaults crash (on one earlier machine the AMX matmul, ggml_backend_amx_mul_mat, segfaulted on the first
    decode). Plain ggml CPU kernels remain (the quantised dot products of whatever SIMD the build found)."""
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
    the head reads all of it; quantised weights live in buffers; the RoPE frequency buffers add a few bytes), less
    NOT_READ_PER_TOKEN (the per-layer table, of which a step gathers one row, and any vision/audio tower)."""
    seen, total = set(), 0
    for name, p in [*model.named_parameters(), *model.named_buffers()]:
        if p.data_ptr() not in seen and not any(part in name for part in NOT_READ_PER_TOKEN):
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def decode_bytes_gguf(path: Path) -> int:
    """Bytes of the GGUF's tensors as stored (llama.cpp reads them in place, quantised), less NOT_READ_PER_TOKEN."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors
               if not any(part in t.name for part in NOT_READ_PER_TOKEN))


def run_trials(engines, trials: int, reader: "ReadBandwidth", samples: dict, quick: bool) -> None:
    """Warm-up, then `trials` rounds; in each round every engine runs every measurement in turn (order reversed
    every other round). Adds to `samples`."""
    for e in engines:
        samples[e.name] = {"prefill": {n: [] for n in PROMPT_LENGTHS}, "decode": []}
    prompts = {n: prompt_ids(n, min(e.vocab for e in engines)) for n in PROMPT_LENGTHS}
    for round_ in range(trials + 1):
        order = engines if round_ % 2 == 0 else engines[::-1]
        if round_:
            samples["bandwidth"].append(reader.sample())
        for e in order:
            t0 = time.perf_counter()
            if round_ == 0 and quick:  # light warm-up: every weight touched once
                t, toks = e.decode(prompts[PROMPT_LENGTHS[0]], 2)
                print(f"warm-up {e.name}: {time.perf_counter() - t0:.0f} s, first tokens {toks[:6]}", flush=True)
                continue
            for n in PROMPT_LENGTHS:
                t = e.prefill(prompts[n])
                if round_:
                    samples[e.name]["prefill"][n].append(t)
            t, toks = e.decode(prompts[PROMPT_LENGTHS[0]], DECODE_TOKENS)
            if round_:
                samples[e.name]["decode"].append(t)
            print(f"round {round_} {e.name}: decode {DECODE_TOKENS / t:.2f} tok/s, first tokens {toks[:6]} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


def summarise(engines: list[dict], samples) -> dict:
    """engines: name and weight_bytes of each engine measured (their models may be freed already)."""
    bandwidth = statistics.median(samples["bandwidth"])
    row = {"read_bandwidth_gb_s": round(bandwidth, 1)}
    for e in engines:
        s, name = samples[e["name"]], e["name"]
        decode_s = statistics.median(s["decode"]) / DECODE_TOKENS
        for n in PROMPT_LENGTHS:
            row[f"{name}_prefill{n}_tok_s"] = round(n / statistics.median(s["prefill"][n]), 1)
        row[f"{name}_ttft{PROMPT_LENGTHS[0]}_ms"] = round(1000 * statistics.median(s["prefill"][PROMPT_LENGTHS[0]]), 1)
        row[f"{name}_decode_tok_s"] = round(1 / decode_s, 2)
        row[f"{name}_weight_mb_per_token"] = round(e["weight_bytes"] / 1e6, 1)
        row[f"{name}_decode_gb_s"] = round(e["weight_bytes"] / decode_s / 1e9, 2)
        row[f"{name}_decode_bandwidth_fraction"] = round(e["weight_bytes"] / decode_s / 1e9 / bandwidth, 3)
        row[f"{name}_version"], row[f"{name}_flags"] = e["version"], e["flags"]
    ours = [e["name"] for e in engines if e["name"].startswith("gemma3n")]
    peers = [e["name"] for e in engines if not e["name"].startswith("gemma3n")]  # not against our own variants
    if "gemma3n" in ours:  # the 270M row's historical keys
        for peer in peers:
            row[f"decode_ratio_vs_{peer}"] = round(row["gemma3n_decode_tok_s"] / row[f"{peer}_decode_tok_s"], 2)
            row[f"prefill{PROMPT_LENGTHS[0]}_ratio_vs_{peer}"] = round(
                row[f"gemma3n_prefill{PROMPT_LENGTHS[0]}_tok_s"] / row[f"{peer}_prefill{PROMPT_LENGTHS[0]}_tok_s"], 2)
    row["ratios"] = {f"{o} / {peer}": {
        "decode": round(row[f"{o}_decode_tok_s"] / row[f"{peer}_decode_tok_s"], 2),
        **{f"prefill{n}": round(row[f"{o}_prefill{n}_tok_s"] / row[f"{peer}_prefill{n}_tok_s"], 2)
           for n in PROMPT_LENGTHS}} for o in ours for peer in peers}
    return row


def measure(label: str, groups: list[list], args, reader: ReadBandwidth, extra: dict | None = None) -> dict:
    """groups: lists of engine factories. Each group is loaded, measured (alternated) and freed before the next."""
    samples, measured, group_names = {"bandwidth": []}, [], []
    for factories in groups:
        engines, t0 = [], time.perf_counter()
        for make in factories:
            t1 = time.perf_counter()
            engines.append(make())
            print(f"{label}: loaded {engines[-1].name} in {time.perf_counter() - t1:.1f} s", flush=True)
        run_trials(engines, args.trials, reader, samples, args.quick)
        measured += [{"name": e.name, "weight_bytes": e.weight_bytes, "version": e.version, "flags": e.flags}
                     for e in engines]
        group_names.append([e.name for e in engines])
        print(f"{label}: group {group_names[-1]} took {time.perf_counter() - t0:.0f} s", flush=True)
        for e in engines:
            getattr(e, "close", lambda: None)()
        del engines
        gc.collect()
    row = {"model": label, **(extra or {}), "alternated_groups": group_names}
    row.update(summarise(measured, samples))
    return row


def bench_270m(args, reader: ReadBandwidth) -> dict:
    from gemma3n.cli import default_model_path
    path = default_model_path()
    engines = [lambda: Ours(path)]
    if args.also_int8:
        engines.append(lambda: Ours(path, name="gemma3n-int8", activations="int8"))
    if args.also_bf16:  # our loader's dtype option: results change (bf16 rounding), bytes halve
        engines.append(lambda: Ours(path, torch.bfloat16, name="gemma3n-bf16"))
    for scheme in filter(None, args.ours_quantize.split(",")):
        engines.append(lambda scheme=scheme: Ours(path, name=f"gemma3n-{scheme}", quantize=scheme))
    if "llama.cpp" not in args.skip:
        engines.append(lambda: LlamaCpp(path, args.threads, no_extra=args.llama_no_extra))
    if "transformers" not in args.skip:
        engines.append(lambda: Transformers(path, None))
    return measure(f"{path.name} (gemma3n computes from its blocks; transformers dequantises to float32)", [engines], args, reader,
                   {"dtype": "as stored"})


def bench_e2b(args, reader: ReadBandwidth) -> dict:
    skip = set(filter(None, args.e2b_skip.split(",")))
    bf16, quantised = [], []
    if args.e2b_hf:
        hf = Path(args.e2b_hf)
        if "gemma3n-bf16" not in skip:
            bf16.append(lambda: Ours(hf, name="gemma3n-bf16"))
        if "transformers" not in skip:
            bf16.append(lambda: Transformers(hf, torch.bfloat16, name="transformers-bf16"))
    for spec in args.e2b_ours:
        label, _, path = spec.rpartition("=")
        path = Path(path)
        name = f"gemma3n-{label or (path.stem if path.suffix == '.gguf' else path.name)}"
        if name not in skip:
            quantised.append(lambda path=path, name=name: Ours(path, name=name))
        if args.also_int8 and f"{name}-int8" not in skip:
            quantised.append(lambda path=path, name=name: Ours(path, name=f"{name}-int8", activations="int8"))
    if args.e2b_gguf and "llama.cpp" not in skip:
        gguf_path = Path(args.e2b_gguf)
        quantised.append(lambda: LlamaCpp(gguf_path, args.threads, name=f"llama.cpp-{gguf_path.stem}",
                                          no_extra=args.llama_no_extra))
    groups = [g for g in ([bf16 + quantised] if args.e2b_one_group else [bf16, quantised]) if g]
    inputs = {"hf": args.e2b_hf, "ours": args.e2b_ours, "llama_cpp_gguf": args.e2b_gguf}
    return measure("E2B shape, random weights", groups, args, reader, {"inputs": inputs})


def main(args) -> None:
    global PROMPT_LENGTHS, DECODE_TOKENS
    torch.set_num_threads(args.threads)
    if args.quick:  # checks that every engine loads and runs, fast; its numbers are not the benchmark's
        args.trials, PROMPT_LENGTHS, DECODE_TOKENS = 1, QUICK_LENGTHS, QUICK_DECODE
    elif args.prompt_lengths:  # e.g. "128": leave out the 512-token prefill on slow machines
        PROMPT_LENGTHS = tuple(int(n) for n in args.prompt_lengths.split(","))
    started, rows, reader = time.perf_counter(), [], ReadBandwidth()
    if not args.no_270m:
        rows.append(bench_270m(args, reader))
    if args.e2b_hf or args.e2b_ours or args.e2b_gguf:
        rows.append(bench_e2b(args, reader))
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
        "quick": args.quick, "prompt_tokens": list(PROMPT_LENGTHS), "decode_tokens": DECODE_TOKENS,
        "seconds": round(time.perf_counter() - started), "rows": rows,
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: one trial of 16/32-token prompts and 8 decoded tokens after a light warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-lengths", default="", help="comma-separated prefill lengths (default 128,512); "
                        "the first is also the decode prompt and the time-to-first-token length")
    parser.add_argument("--also-bf16", action="store_true",
                        help="270M: add gemma3n loading the GGUF as bfloat16 (load(path, dtype='bfloat16'))")
    parser.add_argument("--ours-quantize", default="",
                        help="270M: comma-separated quantize= schemes to add as gemma3n variants (e.g. int8,int4)")
    parser.add_argument("--also-int8", action="store_true",
                        help="add gemma3n with the opt-in int8 activations (the default is exact float32), for the "
                             "270M and for each --e2b-ours checkpoint")
    parser.add_argument("--llama-no-extra", action="store_true",
                        help="load llama.cpp without its extra (repacked) buffers even where its defaults run")
    parser.add_argument("--skip", default="", help="270M: comma-separated peers to leave out: transformers,llama.cpp")
    parser.add_argument("--no-270m", action="store_true", help="leave out the 270M row")
    parser.add_argument("--e2b-hf", "--hf-folder", help="E2B-shape bf16 Hugging Face folder: gemma3n and "
                                                         "transformers, bf16 (--hf-folder: the former name)")
    parser.add_argument("--e2b-ours", action="append", default=[], metavar="[LABEL=]PATH",
                        help="E2B: gemma3n loading this quantised folder or GGUF as stored (repeatable)")
    parser.add_argument("--e2b-gguf", help="E2B: the GGUF llama.cpp made (bench/make_e2b_gguf.py), for llama.cpp")
    parser.add_argument("--e2b-skip", default="",
                        help="E2B: comma-separated engines to leave out (transformers, llama.cpp, gemma3n-bf16, "
                             "gemma3n-LABEL)")
    parser.add_argument("--e2b-one-group", action="store_true",
                        help="E2B: load and alternate all engines together (needs more memory than 24 GiB)")
    main(parser.parse_args())
