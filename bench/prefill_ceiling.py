"""Question: how many prompt tokens per second can an exact (float32) prefill reach on this CPU at most?

An exact prefill multiplies float32 activations by the dequantised weights in float32, as the reference does. Per
prompt token it needs at least 2 x (the weights its products apply to that token) floating-point operations:
every 2-D weight of the language model's layers and its input-side products (the per-layer-input projection,
the AltUp expansion), leaving out the token tables (a gather, not a product), and what a prompt needs for its
last position only, which gemma3n computes for that position alone (the LM head; the AltUp collapse; Gemma 3n's
KV-shared layers, which write no cache, so only the last position's pass through them matters). Gemma 3n's
sparse layers (`activation_sparsity_pattern`, 0.95 in E2B's first 10) zero that fraction of their MLP
activations on average, so the up projection there is needed only for the rest of its outputs (the others are
multiplied by zero) and the down projection only for the rest of its inputs; both are counted at that share. Attention over the prompt and the element-wise work come on top, so the figure below is an upper bound.

The best float32 matrix product rate on this machine is measured on the prefill's own shapes: a `--tokens` x K
activation block times each distinct K x N weight shape of the checkpoint, with torch's GEMM (oneDNN / MKL; the
weight as stored, through F.linear, and transposed, through torch.mm) and with the library's own GEMM
(gemma3n/kernels/gemm_f32.c, which unpacks int4 weights into its panels as it goes; random int4 weights of that
shape), best of `--trials`; each shape counts at the faster of the two. On AVX2 machines MKL ran these shapes well
below the CPU's peak, so the torch-only rate is reported too. The ceiling is the best rate / the operations per
token. A peer's measured prefill (e.g. llama.cpp's, from bench/speed.py, whose integer kernels multiply 8-bit
activations) can be set beside it with `--peer NAME=TOK_PER_S`: a goal of k x the peer is reachable by an exact
prefill only if k x peer <= ceiling.

    python bench/prefill_ceiling.py /work/e2b [--tokens 512] [--threads 2] [--peer llama.cpp=15.2]

`--part audio` asks the same of the audio tower (USM conformer): its 2-D weights act on every frame after the
4x subsampling (750 for a 30 s clip: --tokens 750), the relative-position projection only on the attention
window's distances, so it is left out; the convolutions and attention come on top. `floor_s` is then the least
time an exact float32 encode of that many frames can take here, to set beside a peer's measured encode.

    python bench/prefill_ceiling.py /work/e2b --part audio --tokens 750
"""
from __future__ import annotations

import argparse
import json
import re
import struct
import time
from collections import Counter
from pathlib import Path

import torch

SKIPPED = ("embed_tokens", "lm_head", "vision_tower", "audio_tower", "embed_vision", "embed_audio",
           "altup_unembed_projections")  # the collapse: last position only
AUDIO_SKIPPED = ("relative_position_embedding",)  # applied to the window's distances, not to every frame


def safetensors_shapes(folder: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, from the headers of the folder's safetensors files (no weights read)."""
    shapes = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        shapes.update({name: meta["shape"] for name, meta in header.items() if name != "__metadata__"})
    if not shapes:
        raise SystemExit(f"{folder} has no safetensors files")
    return shapes


def audio_weights(folder: Path) -> list[tuple[list[int], float]]:
    """(shape, 1.0) of the audio tower's 2-D weights that act on every subsampled frame."""
    return [(shape, 1.0) for name, shape in safetensors_shapes(folder).items()
            if "audio_tower" in name and len(shape) == 2 and name.endswith(".weight")
            and not any(s in name for s in AUDIO_SKIPPED)]


def product_weights(folder: Path) -> list[tuple[list[int], float]]:
    """(shape, share of it a prompt token needs) of the 2-D weights a prefill multiplies every token by."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    layers = text["num_hidden_layers"]
    first_shared = layers - text.get("num_kv_shared_layers", 0)
    sparsity = text.get("activation_sparsity_pattern") or [0.0] * layers
    products = []
    for name, shape in safetensors_shapes(folder).items():
        if len(shape) != 2 or not name.endswith(".weight") or any(s in name for s in SKIPPED):
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= first_shared:  # a KV-shared layer: the last position only
            continue
        needed = 1.0 - sparsity[int(layer.group(1))] if layer and re.search(r"\.mlp\.(up|down)_proj\.", name) \
            else 1.0
        products.append((shape, needed))
    return products


def gemm_rates(shapes: Counter, tokens: int, trials: int) -> tuple[float, float]:
    """FLOP/s over the prefill's shapes (each at its best of `trials`, weighted by use): torch's float32 GEMM alone,
    and the faster of it and the library's int4 GEMM per shape."""
    flops = torch_seconds = best_seconds = 0.0
    for (n, k), uses in shapes.items():
        # both layouts of the weight (as stored, [n, k], through F.linear, and transposed, [k, n]): the faster counts
        x, w = torch.randn(tokens, k), torch.randn(n, k)
        w_t = w.t().contiguous()
        torch.nn.functional.linear(x, w), torch.mm(x, w_t)
        torch_best = min(min(_timed(lambda: torch.nn.functional.linear(x, w)), _timed(lambda: torch.mm(x, w_t)))
                         for _ in range(trials))
        ours = _library_gemm(w * 0.02, x, trials)
        flops += uses * 2.0 * tokens * n * k
        torch_seconds += uses * torch_best
        best_seconds += uses * min(torch_best, ours)
    return flops / torch_seconds, flops / best_seconds


def _library_gemm(w: torch.Tensor, x: torch.Tensor, trials: int) -> float:
    """Best time of the library's GEMM over int4 weights of w's shape (inf where it does not take the shape)."""
    from gemma3n import kernels
    from gemma3n.quant.formats import int4_quantize, int4_supported
    n, k = w.shape
    if kernels.native() is None or not int4_supported(n, k, 64):
        return float("inf")
    packed, sz = int4_quantize(w, 64, torch.bfloat16)
    if kernels.int4_gemm(packed, sz, 64, x) is None:
        return float("inf")
    return min(_timed(lambda: kernels.int4_gemm(packed, sz, 64, x)) for _ in range(trials))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="Hugging Face checkpoint folder (safetensors + config.json)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--peer", action="append", default=[], metavar="NAME=TOK_PER_S")
    ap.add_argument("--part", choices=["text", "audio"], default="text")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    products = product_weights(args.folder) if args.part == "text" else audio_weights(args.folder)
    macs = sum(n * k * needed for (n, k), needed in products)
    torch_rate, rate = gemm_rates(Counter(tuple(shape) for shape, _ in products), args.tokens, args.trials)
    ceiling = rate / (2.0 * macs)
    result = {"folder": str(args.folder), "part": args.part, "tokens": args.tokens, "threads": args.threads,
              "torch": torch.__version__, "weights_multiplied_per_token": int(macs),
              "gemm_gflops": round(rate / 1e9, 2), "torch_gemm_gflops": round(torch_rate / 1e9, 2),
              "exact_prefill_ceiling_tok_s": round(ceiling, 2),
              "floor_s": round(args.tokens / ceiling, 3)}
    for peer in args.peer:
        name, tok_s = peer.split("=")
        result[f"ceiling_over_{name}"] = round(ceiling / float(tok_s), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
