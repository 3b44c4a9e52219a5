"""Peak RSS of gemma3n with an image in the prompt, on a Gemma 3 4B-shape checkpoint (bench/make_gemma3_checkpoint.py,
then `gemma3n quantize SRC DST --scheme int4`).

The prompt ids are built directly (the bench tokenizer, the 270M's, has no <image_soft_token>): text, then
"<start_of_image>", 256 image tokens, "<end_of_image>", text. One 896 px image through the SigLIP tower (loaded on
first use, quantised per the checkpoint's scheme) and the projector, then NEW greedy tokens.
Usage: python bench/memory_gemma3_image.py CHECKPOINT [NEW]   (prints one JSON line last)
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch


def rss_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**30


def main(folder: str, new: int = 16) -> dict:
    import gemma3n
    from gemma3n.engine.generate import generate_ids
    from gemma3n.engine.sampling import SamplingParams
    from gemma3n.processor.gemma3_image import Gemma3ImageProcessor

    torch.manual_seed(0)
    start = time.perf_counter()
    model = gemma3n.load(folder)
    load, after_load = time.perf_counter() - start, rss_gib()
    cfg = model.config
    text = model.tokenizer.encode("Describe this picture in detail.", add_special_tokens=True)
    ids = (text + [cfg.boi_token_id] + [cfg.image_token_id] * cfg.vision_soft_tokens_per_image
           + [cfg.eoi_token_id] + text[1:])
    picture = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    pixels, _ = Gemma3ImageProcessor.from_config(None)([picture])
    start = time.perf_counter()
    prompt = torch.tensor([ids])
    embeds = model.embed_media(prompt, pixel_values=pixels)
    encode, after_encode = time.perf_counter() - start, rss_gib()
    out = generate_ids(model.decoder, prompt, SamplingParams(temperature=0.0, max_new_tokens=new), stop_ids=(),
                       inputs_embeds=embeds)[0]
    return {"bench": "memory_gemma3_image", "checkpoint": folder, "torch": torch.__version__,
            "quantization": getattr(model.lm.quant_scheme, "to_dict", lambda: None)(),
            "prompt_tokens": len(ids), "new_tokens": len(out), "load_seconds": round(load, 2),
            "image_encode_seconds": round(encode, 2), "total_seconds": round(time.perf_counter() - start, 2),
            "rss_after_load_gib": round(after_load, 3), "rss_after_image_gib": round(after_encode, 3),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1], *(int(a) for a in sys.argv[2:]))))
