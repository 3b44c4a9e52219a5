"""Question: how many float32 multiply-adds per second can this CPU do at most, on the threads a benchmark uses?

That is the ceiling of every exact float32 product here (the towers' GEMMs, prompts over dequantised weights): a
ratio a goal asks for is out of reach when the products alone, at this rate, take longer than the goal allows.
The loop is twelve independent chains of FMAs per thread (enough to cover the FMA latency on every x86 core of the
last decade), 256-bit and 512-bit (where the CPU has AVX-512), compiled here with the system's C compiler.
The last line printed is one JSON object.
Run: python bench/fma_peak.py [--threads 2] [--seconds 0.3]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = r"""
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#define CHAINS 12
#define WIDE(name, vec, set1, fma, lanes)                                                                     \
__attribute__((target("avx2,fma,avx512f"))) static double name(long iters, int threads) {                     \
    float sink = 0;                                                                                           \
    double t0 = omp_get_wtime();                                                                              \
    _Pragma("omp parallel num_threads(threads) reduction(+:sink)")                                            \
    {                                                                                                         \
        vec a[CHAINS], m = set1(0.999999f), c = set1(1e-7f);                                                  \
        for (int i = 0; i < CHAINS; i++) a[i] = set1((float)i);                                               \
        for (long it = 0; it < iters; it++)                                                                   \
            for (int i = 0; i < CHAINS; i++) a[i] = fma(a[i], m, c);                                          \
        for (int i = 0; i < CHAINS; i++) sink += ((float *)&a[i])[0];                                         \
    }                                                                                                         \
    double t = omp_get_wtime() - t0;                                                                          \
    if (sink == 12345.0f) printf(" ");                                                                        \
    return 2.0 * lanes * CHAINS * (double)iters * threads / t / 1e9;                                          \
}
WIDE(gflops256, __m256, _mm256_set1_ps, _mm256_fmadd_ps, 8)
WIDE(gflops512, __m512, _mm512_set1_ps, _mm512_fmadd_ps, 16)
int main(int argc, char **argv) {
    int threads = atoi(argv[1]), wide = atoi(argv[3]);
    long iters = atol(argv[2]);
    double best256 = 0, best512 = 0;
    for (int rep = 0; rep < 3; rep++) {
        double g = gflops256(iters, threads);
        if (g > best256) best256 = g;
        if (wide) { g = gflops512(iters / 2, threads); if (g > best512) best512 = g; }
    }
    printf("%.1f %.1f\n", best256, best512);
    return 0;
}
"""


def main(args) -> None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("no C compiler (cc / gcc) found")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    wide = " avx512f" in flags
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "peak.c", Path(tmp) / "peak"
        src.write_text(SOURCE)
        subprocess.run([compiler, "-O3", "-fopenmp", str(src), "-o", str(exe)], check=True)
        # about args.seconds per pass at 3 GHz and two FMAs a cycle: 12 chains of 8 lanes
        iters = int(args.seconds * 3e9 * 2 / 12)
        out = subprocess.run([str(exe), str(args.threads), str(iters), str(int(wide))], check=True,
                             capture_output=True, text=True).stdout.split()
    row = {"bench": "fma_peak", "threads": args.threads, "cpu": platform.processor() or platform.machine(),
           "gflops_256bit": float(out[0]), "gflops_512bit": float(out[1]) if wide else None}
    print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=0.3)
    main(parser.parse_args())
