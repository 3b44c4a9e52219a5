"""Question: how long does encoding one 768 x 768 image with the Gemma 3n vision tower (MobileNet-V5-300M) take
on this CPU, in gemma3n and in transformers (TimmWrapper around timm's mobilenetv5_300m_enc), in the same run?

Both towers hold the same weights (timm's initialisation; the time does not depend on the values) in the chosen
dtype. Wall time and process CPU time are both reported. Trials alternate between the two so that load from other processes hits both alike; a warm-up each first,
then the median of TRIALS trials. The last line printed is one JSON object.
Run: python bench/vision_encode.py [--size 768] [--trials 5] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


def build_towers(dtype: torch.dtype):
    from transformers import AutoModel, Gemma3nVisionConfig

    from gemma3n.model.vision import build_vision_tower
    config = Gemma3nVisionConfig()
    reference = AutoModel.from_config(config).eval().to(dtype)
    with torch.device("meta"):
        ours = build_vision_tower(config.to_dict())
    ours.load_state_dict(reference.timm_model.state_dict(), strict=True, assign=True)
    return ours.eval().to(memory_format=torch.channels_last), reference  # as gemma3n's tower loader lays it out


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds summed over threads): on a shared machine the wall time mostly measures
    waiting for a core, the CPU time what the work itself costs."""
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - wall, time.process_time() - cpu


def main(args) -> None:
    import transformers
    dtype = getattr(torch, args.dtype)
    ours, reference = build_towers(dtype)
    pixels = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    run_ours = lambda: ours(pixels)  # noqa: E731
    run_reference = lambda: reference(pixel_values=pixels, do_pooling=False)  # noqa: E731
    timed(run_ours), timed(run_reference)  # warm-up
    ours_s, reference_s = [], []
    for _ in range(args.trials):
        ours_s.append(timed(run_ours))
        reference_s.append(timed(run_reference))
    ours_median, reference_median = (statistics.median(t[0] for t in s) for s in (ours_s, reference_s))
    ours_cpu, reference_cpu = (statistics.median(t[1] for t in s) for s in (ours_s, reference_s))
    row = {
        "bench": "vision_encode", "model": "mobilenetv5_300m_enc (Gemma 3n vision tower)", "dtype": args.dtype,
        "image_px": args.size, "batch": 1, "trials": args.trials, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gemma3n_s": round(ours_median, 3), "transformers_s": round(reference_median, 3),
        "speedup_vs_transformers": round(reference_median / ours_median, 2),
        "gemma3n_cpu_s": round(ours_cpu, 3), "transformers_cpu_s": round(reference_cpu, 3),
        "cpu_time_ratio_vs_transformers": round(reference_cpu / ours_cpu, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    main(parser.parse_args())
