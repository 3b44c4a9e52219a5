"""Peak RSS of gemma3n with an image in the prompt, on an E2B-shape checkpoint.

The bench checkpoint's tokenizer (the Gemma 3 270M's) has no Gemma 3n media tokens, so the prompt ids are built
directly: text, then <start_of_image>, 256 image placeholders, <end_of_image>, text. One 768 px image through the
vision tower (loaded on first use, quantised per the checkpoint's scheme), 32 new greedy tokens.
Usage: python bench/memory_image.py CHECKPOINT   (prints one JSON line last)
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
import torch


def main(folder: str) -> dict:
    import gemma3n
    from gemma3n.engine.generate import generate_ids
    from gemma3n.engine.sampling import SamplingParams
    from gemma3n.processor.image import ImageProcessor

    torch.manual_seed(0)
    start = time.perf_counter()
    model = gemma3n.load(folder)
    load = time.perf_counter() - start
    cfg = model.config
    text = model.tokenizer.encode("Describe this picture in detail.", add_special_tokens=True)
    ids = (text + [cfg.boi_token_id] + [cfg.image_token_id] * cfg.vision_soft_tokens_per_image
           + [cfg.eoi_token_id] + text[1:])
    picture = (np.random.default_rng(0).random((600, 800, 3)) * 255).astype(np.uint8)
    pixels = ImageProcessor.from_config(None)([picture])
    start = time.perf_counter()
    prompt = torch.tensor([ids])
    embeds = model.embed_media(prompt, pixel_values=pixels)
    encode = time.perf_counter() - start
    out = generate_ids(model.decoder, prompt, SamplingParams(temperature=0.0, max_new_tokens=32), stop_ids=(),
                       inputs_embeds=embeds)[0]
    return {"bench": "memory_image", "checkpoint": folder, "torch": torch.__version__, "prompt_tokens": len(ids),
            "new_tokens": len(out), "load_seconds": round(load, 2), "image_encode_seconds": round(encode, 2),
            "total_seconds": round(time.perf_counter() - start, 2),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(main(sys.argv[1])))
