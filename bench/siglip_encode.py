"""Question: how long does encoding one 896 x 896 image with Gemma 3's vision side (SigLIP So400m/14, 27 layers,
4096 patches, then the projector's pooling to 256 tokens) take on this CPU, in gemma3n and in transformers
(SiglipVisionModel + Gemma3MultiModalProjector, its default attention), in the same run?

Both hold the same random weights (the time does not depend on the values) in the chosen dtype; a 4B-width
projector (2560). Trials alternate between the two so that load from other processes hits both alike; a warm-up
each first, then the median. Wall time and process CPU time are both reported. The last line is one JSON object.
Run: python bench/siglip_encode.py [--trials 3] [--warmup 1] [--dtype float32|bfloat16] [--layers 27]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

VISION = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=896, patch_size=14,
              vision_use_head=False)


def build(dtype: torch.dtype, layers: int):
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    from gemma3n.model.siglip import MultiModalProjector, SiglipConfig, build_siglip_tower
    vision = dict(VISION, num_hidden_layers=layers)
    config = Gemma3Config(vision_config=SiglipVisionConfig(**vision), text_config=Gemma3TextConfig(hidden_size=2560))
    torch.manual_seed(0)
    tower = SiglipVisionModel(config.vision_config).eval().to(dtype)
    projector = Gemma3MultiModalProjector(config).eval().to(dtype)
    with torch.no_grad():
        projector.mm_input_projection_weight.normal_(0, 0.02)
    with torch.device("meta"):
        ours_tower = build_siglip_tower(vision)
        ours_projector = MultiModalProjector(SiglipConfig.from_dict(vision), 2560, 256)
    ours_tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()
                                if "position_ids" not in k}, strict=True, assign=True)
    ours_projector.load_state_dict(projector.state_dict(), strict=True, assign=True)
    ours = lambda pixels: ours_projector(ours_tower(pixels))  # noqa: E731
    reference = lambda pixels: projector(tower(pixel_values=pixels).last_hidden_state)  # noqa: E731
    return ours, reference, tower.config._attn_implementation


def timed(fn) -> tuple[float, float, torch.Tensor]:
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return time.perf_counter() - wall, time.process_time() - cpu, out


def main(args) -> None:
    import transformers
    dtype = getattr(torch, args.dtype)
    ours, reference, attention = build(dtype, args.layers)
    pixels = (torch.rand(1, 3, 896, 896, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(dtype)
    for _ in range(args.warmup):
        timed(lambda: ours(pixels)), timed(lambda: reference(pixels))
    ours_s, reference_s = [], []
    for _ in range(args.trials):
        ours_s.append(timed(lambda: ours(pixels)))
        reference_s.append(timed(lambda: reference(pixels)))
    got, want = ours_s[-1][2].float(), reference_s[-1][2].float()
    median = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
    row = {
        "bench": "siglip_encode", "model": f"SigLIP So400m/14 ({args.layers} layers) + Gemma 3 projector",
        "dtype": args.dtype, "image_px": 896, "batch": 1, "trials": args.trials,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "transformers_attention": attention, "cpu": platform.processor() or platform.machine(),
        "gemma3n_s": round(median(ours_s, 0), 2), "transformers_s": round(median(reference_s, 0), 2),
        "speedup_vs_transformers": round(median(reference_s, 0) / median(ours_s, 0), 2),
        "gemma3n_cpu_s": round(median(ours_s, 1), 2), "transformers_cpu_s": round(median(reference_s, 1), 2),
        "cpu_time_ratio_vs_transformers": round(median(reference_s, 1) / median(ours_s, 1), 2),
        "max_rel_diff": float(((got - want).abs().max() / want.abs().max())),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each first (1)")
    main(parser.parse_args())
