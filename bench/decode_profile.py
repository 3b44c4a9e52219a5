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

With --threads 1 each step's CPU time is reported too: on a shared machine it compares two trees where wall time
mostly measures the neighbours.

Run: python bench/decode_profile.py [--model PATH ...] [--steps 32] [--threads 2]
(default: the packaged Gemma 3 270M Q4_K_M GGUF)

`--kernels` instead times the matrix-vector kernels alone, one thread: one real tensor of each GGUF type of the
model (the largest) and random int8 / int4 weights of 16384 x 8192, float32 and int8 activations, in G weights/s per
core and GB/s against one core's read bandwidth, sampled beside each kernel (the 270M's layer tensors are
cache-resident, so their GB/s can pass it; its head and the 16384 x 8192 weights stream from memory).
`--baseline REV` builds the kernels of git revision REV too and alternates the two libraries trial by trial (same
run, same machine load), for before / after ratios.
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
            t0, c0 = time.perf_counter(), time.thread_time()
            nxt = lm(nxt, None, cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
            step, step_cpu = time.perf_counter() - t0, time.thread_time() - c0
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
            if torch.get_num_threads() == 1:  # all the work is on this thread: its CPU time, which the machine's
                row["step, CPU time of the one thread"] = step_cpu  # other load barely moves (wall time does)
            rows.append(row)
    return rows


def build_revision(rev: str) -> Path:
    """The native library of git revision `rev`, compiled as gemma3n.kernels compiles the tree's own."""
    import shutil
    import subprocess
    import tempfile
    from gemma3n import kernels
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="g3n-baseline-"))
    for src in kernels._SOURCES:  # a file that revision does not have yet is not included by its native.c
        shown = subprocess.run(["git", "-C", str(repo), "show", f"{rev}:{src.relative_to(repo).as_posix()}"],
                               capture_output=True)
        if shown.returncode == 0:
            (tmp / src.name).write_bytes(shown.stdout)
    out = tmp / "native.so"
    cc = shutil.which("cc") or shutil.which("gcc")
    subprocess.run([cc, *kernels.COMPILE_FLAGS, str(tmp / "native.c"), "-o", str(out)], check=True)
    return out


def _kernel_cases(path: str):
    """(label, n, k, bytes, call(lib, x, y, q8), has an int8-activation kernel) for one tensor of each GGUF type in
    the file, plus int8 / int4."""
    import ctypes
    import gguf
    import numpy as np
    from gemma3n import kernels
    from gemma3n.quant.formats import int4_quantize, int8_quantize
    reader = gguf.GGUFReader(path)
    largest = {}
    for t in reader.tensors:
        if len(t.shape) == 2 and t.tensor_type not in (gguf.GGMLQuantizationType.F32,):
            if t.n_elements > largest.get(t.tensor_type, (0, None))[0]:
                largest[t.tensor_type] = (t.n_elements, t)
    cases = []
    for qt, (_, t) in sorted(largest.items()):
        k, n = int(t.shape[0]), int(t.shape[1])
        raw = torch.from_numpy(np.ascontiguousarray(np.asarray(t.data).reshape(n, -1)))
        def call(lib, x, y, q8, raw=raw, qt=int(qt), n=n, k=k):
            if q8:
                return lib.g3n_gguf_matmul_q8(qt, raw.data_ptr(), n, k, None, x.data_ptr(), 1, y.data_ptr(), 1)
            return lib.g3n_gguf_matmul(qt, raw.data_ptr(), n, k, None, x.data_ptr(), 1, y.data_ptr(), 1, 1)
        cases.append((f"{qt.name} {n}x{k} ({t.name})", n, k, raw.numel(), call,
                      bool(kernels.native().g3n_q8_supported(int(qt)))))
    n, k = 16384, 8192  # larger than the caches (int4: 64 MB), as a decode step's weights are
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.02
    q8w, s8 = int8_quantize(w, torch.bfloat16)
    q4w, sz4 = int4_quantize(w, 64, torch.bfloat16)
    bf16 = 2
    cases.append((f"int8 rows {n}x{k}", n, k, q8w.numel() + 2 * n,
                  lambda lib, x, y, q8: (lib.g3n_int8_matmul_q8(q8w.data_ptr(), s8.data_ptr(), bf16, n, k, None,
                                                                 x.data_ptr(), 1, y.data_ptr(), 1) if q8 else
                                         lib.g3n_int8_matmul(q8w.data_ptr(), s8.data_ptr(), bf16, n, k, None,
                                                             x.data_ptr(), 1, y.data_ptr(), 1, 1)), True))
    cases.append((f"int4 tiles g64 {n}x{k}", n, k, q4w.numel() + sz4.numel() * 2,
                  lambda lib, x, y, q8: (lib.g3n_int4_matmul_q8(q4w.data_ptr(), sz4.data_ptr(), bf16, n, k, 64,
                                                                 x.data_ptr(), 1, y.data_ptr(), 1) if q8 else
                                         lib.g3n_int4_matmul(q4w.data_ptr(), sz4.data_ptr(), bf16, n, k, 64, None, 0,
                                                             x.data_ptr(), 1, y.data_ptr(), 1, 1)), True))
    del ctypes
    return cases


def kernel_rates(path: str, baseline: str | None, trials: int) -> dict:
    """G weights/s per core of each kernel (one thread, m = 1), this tree's library against `baseline`'s."""
    import ctypes
    from gemma3n import kernels
    libs = {"this tree": kernels.native()}
    if baseline:
        lib = ctypes.CDLL(str(build_revision(baseline)))
        kernels._declare(lib)
        libs[f"baseline {baseline}"] = lib
    torch.set_num_threads(1)
    reader = ReadBandwidth(0.5)  # one core, sampled beside every kernel (the machine's load changes)
    rows, reads = [], []
    for label, n, k, nbytes, call, q8_kernel in _kernel_cases(path):
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        for q8 in (False, True) if q8_kernel else (False,):
            times = {name: [] for name in libs}
            outs = {}
            for trial in range(trials):
                # alternated, so both see the same machine load; the order flips every trial, so that neither is
                # always the one that finds the other's weights left in the last-level cache
                for name, lib in (list(libs.items()) if trial % 2 == 0 else list(libs.items())[::-1]):
                    y = torch.empty(1, n)
                    t0 = time.perf_counter()
                    rc = call(lib, x, y, q8)
                    times[name].append(time.perf_counter() - t0)
                    if rc:
                        raise SystemExit(f"{label}: kernel returned {rc}")
                    outs[name] = y
            read = reader.sample()
            reads.append(read)
            row = {"kernel": label, "activations": "int8" if q8 else "float32", "read_GBps_one_core": round(read, 2)}
            for name, ts in times.items():
                best = min(ts)
                row[name] = {"G_weights_per_s": round(n * k / best / 1e9, 2), "GBps": round(nbytes / best / 1e9, 2),
                             "share_of_read": round(nbytes / best / 1e9 / read, 3),
                             "spread": round(statistics.median(ts) / best, 2)}
            rows.append(row)
            print(json.dumps(row))
    return {"read_GBps_one_core_median": round(statistics.median(reads), 2), "trials": trials, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help="checkpoint folder or GGUF (repeatable)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernels", action="store_true", help="time the matrix-vector kernels alone (one thread)")
    ap.add_argument("--baseline", metavar="REV", help="with --kernels: also the kernels of this git revision")
    ap.add_argument("--trials", type=int, default=15, help="with --kernels: timings per kernel (best is kept)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.model:
        from gemma3n.cli import default_model_path
        args.model = [default_model_path()]
    if args.kernels:
        print(json.dumps(kernel_rates(str(args.model[0]), args.baseline, args.trials)))
        return
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
