"""Question: how large should the float32 block of weight be that long prompts dequantise at once, on this CPU?

Prompts longer than the native kernels' row limit multiply densely: a block of output rows of a quantised weight
(int4, int8, GGUF) is unpacked to float32 and multiplied by torch's GEMM (`gemma3n.quant.modules.blockwise_matmul`,
`Int4Linear._native_blockwise`). A block the GEMM reads back from the cache the unpacking just wrote it to saves a
round trip through memory; too small a block leaves the GEMM narrow. The block is `cache_block_rows(in_features)`,
sized by `DENSE_BLOCK_BYTES`. This script loads each model once and prefills the same random prompts with several
sizes, alternated within each round (`DENSE_BLOCK_BYTES`, or for a fixed row count the function itself, is set
before each measurement; the values computed are the same up to float32 summation order), and prints the median
prefill rate per size.

    python bench/prefill_blocks.py /work/e2b-int4 /work/e2b-Q4_K_M.gguf [--sizes rows:2048,1M,2M,4M,8M]
        [--prompt-lengths 128,512] [--rounds 4]

`rows:N` is a fixed N rows whatever the width (gemma3n's rule before byte-sized blocks); `4M` is 4 MiB.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gemma3n  # noqa: E402
from gemma3n.quant import modules  # noqa: E402


def use_size(size: str, default_rule) -> None:
    """'rows:N' -> a fixed N rows (the block function swapped); '4M' / '512K' -> gemma3n's own rule with
    DENSE_BLOCK_BYTES set to that many bytes."""
    if size.startswith("rows:"):
        rows = int(size[5:])
        modules.cache_block_rows = lambda in_features: rows
    else:
        modules.cache_block_rows = default_rule
        modules.DENSE_BLOCK_BYTES = int(float(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1].upper()])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--sizes", default="rows:2048,1M,2M,4M,8M")
    parser.add_argument("--prompt-lengths", default="128,512")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    sizes = args.sizes.split(",")
    lengths = [int(n) for n in args.prompt_lengths.split(",")]
    default_rule, default_bytes = modules.cache_block_rows, modules.DENSE_BLOCK_BYTES
    for path in args.models:
        lm = gemma3n.load(path).lm
        generator = torch.Generator().manual_seed(0)
        prompts = {n: torch.randint(1000, 200000, (1, n), generator=generator) for n in lengths}

        def prefill(ids: torch.Tensor) -> float:
            with torch.inference_mode():
                cache = lm.new_cache(1, ids.shape[1] + 1)
                start = time.perf_counter()
                lm(ids, None, cache, last_only=True)[:, -1].argmax(-1)
                return time.perf_counter() - start

        for ids in prompts.values():  # page the mapped weights in before measuring
            prefill(ids)
        seconds = {(size, n): [] for size in sizes for n in lengths}
        try:
            for _ in range(args.rounds):
                for size in sizes:
                    use_size(size, default_rule)
                    for n, ids in prompts.items():
                        seconds[size, n].append(prefill(ids))
        finally:
            modules.cache_block_rows, modules.DENSE_BLOCK_BYTES = default_rule, default_bytes
        for n in lengths:
            print(json.dumps({"model": path, "prompt_tokens": n, "default_bytes": modules.DENSE_BLOCK_BYTES,
                              "threads": torch.get_num_threads(), **{
                                  f"{size}_tok_s": round(n / statistics.median(seconds[size, n]), 1)
                                  for size in sizes}}), flush=True)
        lm = None  # free this model before loading the next


if __name__ == "__main__":
    main()
