"""Question: how long does the Gemma 3n audio tower take to encode 30 s of audio on this CPU, in gemma3n and in
transformers, measured in the same run?

No real Gemma 3n weights are reachable here, so both run the released E2B/E4B audio tower sizes (architecture.md
8.1: 12 conformer blocks, width 1536) with the same seeded random weights (ours loads the reference's tensors).
Input: the log-mel features of 30 s (2997 frames -> 188 tokens) computed by our extractor (also timed, and the
reference extractor beside it). Each trial encodes one clip; warm-up first, then the median of TRIALS trials,
ours and the reference alternating.
The last line printed is one JSON object.
Run: python bench/audio_encode.py [--trials 5] [--dtype float32|bfloat16]  (PYTHONPATH=. from a worktree)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch


def median_seconds(first, second, trials: int) -> tuple[float, float]:
    """Median time of each of two functions; their trials alternate so that load from other processes on the
    machine falls on both alike."""
    first(), second()  # warm-up
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(trials):
        for fn, record in ((first, times[0]), (second, times[1])):
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def towers(dtype: torch.dtype):
    from transformers import Gemma3nAudioConfig
    from transformers.initialization import no_init_weights
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nAudioEncoder

    from gemma3n.model.audio import build_audio_tower

    cfg = Gemma3nAudioConfig()
    g = torch.Generator().manual_seed(0)
    with no_init_weights():
        reference = Gemma3nAudioEncoder(cfg).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02 + (1.0 if "norm" in name else 0.0))
    reference.to(dtype)
    with torch.device("meta"):
        ours = build_audio_tower(cfg.to_dict()).eval()
    ours.load_state_dict(reference.state_dict(), assign=True)  # the very same tensors
    return reference, ours


def main() -> None:
    from transformers import Gemma3nAudioFeatureExtractor

    from gemma3n.processor.audio_features import AudioFeatureExtractor

    dtype = getattr(torch, ARGS.dtype)
    t = np.arange(30 * 16_000) / 16_000
    wave = (0.3 * np.sin(2 * np.pi * (200 + 50 * t) * t) + 0.02 * np.random.default_rng(0).standard_normal(len(t)))
    wave = wave.astype(np.float32)
    ours_fe, ref_fe = AudioFeatureExtractor(), Gemma3nAudioFeatureExtractor()
    features, mask = ours_fe([wave])
    reference, ours = towers(dtype)
    features = features.to(dtype)
    with torch.inference_mode():
        ref_out = reference(features, ~mask).last_hidden_state
        our_out, _ = ours(features, ~mask)
        max_diff = (ref_out.float() - our_out.float()).abs().max().item()
        ours_s, ref_s = median_seconds(lambda: ours(features, ~mask), lambda: reference(features, ~mask),
                                       ARGS.trials)
    fe_ours, fe_ref = median_seconds(lambda: ours_fe([wave]), lambda: ref_fe([wave], return_tensors="pt"),
                                     ARGS.trials)
    import transformers
    print(json.dumps({
        "bench": "audio_encode", "audio_seconds": 30, "frames": int(features.shape[1]),
        "tokens": int(our_out.shape[1]), "weights": "random, released E2B/E4B audio tower sizes",
        "dtype": ARGS.dtype, "trials": ARGS.trials, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__, "cpu": platform.processor() or platform.machine(),
        "gemma3n_encode_s": round(ours_s, 3), "transformers_encode_s": round(ref_s, 3),
        "encode_speedup_vs_transformers": round(ref_s / ours_s, 2),
        "gemma3n_features_s": round(fe_ours, 4), "transformers_features_s": round(fe_ref, 4),
        "max_abs_diff": max_diff,
    }))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ARGS = parser.parse_args()
    main()
