"""Question: how fast are the matrix-vector kernels of one GGUF type on rows of a given length, against another
revision's, with x in float32 (exact, the default) or rounded to int8 (the opt-in)?

Random blocks of the type (finite scales), several copies cycled so that together they outgrow the last-level
cache (as a decode step's weights do), one activation row; the two libraries alternated trial by trial (same run,
same machine load), the best of the trials kept. Prints, per shape and thread count, G weights/s for this tree and
the baseline, and the largest relative difference of their outputs (0 where only the speed changed, ~1e-7 where
the order of the float additions did).

Run: python bench/kernel_rows.py Q5_0 [--baseline HEAD~1] [--shape 2048x640 --shape 2048x2048] [--int8]
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_profile import build_revision  # noqa: E402
from tests.quant.test_kernels import random_rows  # noqa: E402  (random blocks, every scale field finite)

CACHE_OUTGROWN = 40_000_000  # weights cycled per timing: well past a last-level cache


def main() -> None:
    import gguf
    from gemma3n import kernels
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("type", help="GGUF type name: Q4_0, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K")
    ap.add_argument("--baseline", default="HEAD", metavar="REV", help="git revision to compare with (HEAD)")
    ap.add_argument("--shape", action="append", metavar="NxK", help="rows x values (repeatable; 2048x640, 2048x2048)")
    ap.add_argument("--int8", action="store_true", help="the int8-activation kernels instead of the exact ones")
    ap.add_argument("--trials", type=int, default=8)
    args = ap.parse_args()
    qt = gguf.GGMLQuantizationType[args.type]
    libs = {"this tree": kernels.native()}
    lib = ctypes.CDLL(str(build_revision(args.baseline)))
    kernels._declare(lib)
    libs[args.baseline] = lib
    for shape in args.shape or ["2048x640", "2048x2048"]:
        n, k = (int(v) for v in shape.split("x"))
        mats = [torch.from_numpy(random_rows(qt, n, k, seed=copy))
                for copy in range(max(1, CACHE_OUTGROWN // (n * k)))]
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        for threads in (1, 2):
            best, outs = {name: float("inf") for name in libs}, {}
            for trial in range(args.trials):
                for name, L in (list(libs.items()) if trial % 2 == 0 else list(libs.items())[::-1]):
                    y = torch.empty(1, n)
                    t0 = time.perf_counter()
                    for raw in mats:
                        if args.int8:
                            rc = L.g3n_gguf_matmul_q8(int(qt), raw.data_ptr(), n, k, None, x.data_ptr(), 1,
                                                      y.data_ptr(), threads)
                        else:
                            rc = L.g3n_gguf_matmul(int(qt), raw.data_ptr(), n, k, None, x.data_ptr(), 1,
                                                   y.data_ptr(), threads, kernels.VECTORISED)
                        if rc:
                            raise SystemExit(f"{name}: kernel returned {rc}")
                    best[name] = min(best[name], time.perf_counter() - t0)
                    outs[name] = y
            a, b = outs.values()
            diff = float((a - b).abs().max() / b.abs().max())
            rates = ", ".join(f"{name} {n * k * len(mats) / t / 1e9:.1f}" for name, t in best.items())
            print(f"{args.type} {'int8' if args.int8 else 'float32'} x, {n}x{k}, {threads} thread(s): G weights/s "
                  f"{rates}; max relative difference {diff:.1e}")


if __name__ == "__main__":
    main()
