"""Write a random-weight checkpoint of the exact Gemma 3 4B shape (google/gemma-3-4b-it: text and SigLIP tower;
bf16, sharded), for memory and speed measurements only.

    python bench/make_gemma3_checkpoint.py /work/gemma3-4b

Names and shapes are those of transformers' Gemma3ForConditionalGeneration built on the meta device from the
published config.json (`lm_head.weight` tied, not stored); values as bench/make_e2b_checkpoint.py writes them, a
chunk of rows at a time (~8.6 GB written with well under 1 GB of RAM); the tokenizer of the packaged Gemma 3 270M.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemma3n.checkpoint.writer import write_checkpoint  # noqa: E402
from make_e2b_checkpoint import random_chunks, write_tokenizer  # noqa: E402

# google/gemma-3-4b-it's config.json (the text fields it leaves out take Gemma3TextConfig's defaults)
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False},
}


def tensor_shapes() -> dict[str, tuple[int, ...]]:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    config = Gemma3Config(**{k: v for k, v in GEMMA3_4B.items() if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = Gemma3ForConditionalGeneration(config)
    # the released layout's names (what transformers writes back and the released files hold)
    rename = (("model.language_model.", "language_model.model."), ("model.vision_tower.vision_model.",
              "vision_tower.vision_model."), ("model.vision_tower.", "vision_tower.vision_model."),
              ("model.multi_modal_projector.", "multi_modal_projector."))
    shapes = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" or name.endswith("position_ids"):
            continue
        for old, new in rename:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        shapes[name] = tuple(t.shape)
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    shapes = tensor_shapes()
    entries = [(name, shape, torch.bfloat16, lambda name=name, shape=shape, i=i: random_chunks(name, shape, i))
               for i, (name, shape) in enumerate(sorted(shapes.items()))]
    files = write_checkpoint(args.folder, entries)
    (args.folder / "config.json").write_text(json.dumps(GEMMA3_4B, indent=2))
    write_tokenizer(args.folder)
    print(json.dumps({"folder": str(args.folder), "tensors": len(shapes),
                      "parameters": sum(math.prod(s) for s in shapes.values()), "shards": len(files),
                      "bytes": sum(f.stat().st_size for f in files)}))


if __name__ == "__main__":
    main()
