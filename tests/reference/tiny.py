"""Seeded tiny Gemma 3n checkpoints written by transformers' own save_pretrained (the real file layout)."""
from __future__ import annotations

import json
from pathlib import Path

import torch

S, F = "sliding_attention", "full_attention"

# Three decoders that together cover: sequences longer than the window, shared layers of both types, sparse and
# dense layers, different widths per layer, a layer pattern that is not 4:1, and the default 4:1 pattern.
TEXT_CONFIGS = {
    "mixed": dict(
        num_hidden_layers=6, layer_types=[S, F, S, F, S, F], intermediate_size=[96, 128, 64, 96, 160, 96],
        activation_sparsity_pattern=[0.95, 0.0, 0.95, 0.0, 0.0, 0.0], num_kv_shared_layers=2, sliding_window=8,
    ),
    "four_to_one": dict(
        num_hidden_layers=12, intermediate_size=128, num_kv_shared_layers=4, sliding_window=16,
    ),
    "multimodal": dict(
        num_hidden_layers=5, layer_types=[S, F, S, S, F], intermediate_size=[64, 96, 128, 96, 64],
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0, 0.95], num_kv_shared_layers=2, sliding_window=8,
        vocab_size_per_layer_input=384,  # as in the real model, the PLE vocabulary ends where the vision one starts
    ),
}
COMMON = dict(vocab_size=512, vocab_size_per_layer_input=480, hidden_size=64, hidden_size_per_layer_input=16,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, laurel_rank=8,
              max_position_embeddings=2048, rms_norm_eps=1e-6)


# The tiny multimodal model's media vocabularies, laid out like the real one inside its 512-token vocabulary:
# text [0, 384), vision [384, 448) (<end_of_image> first, then the image soft token), audio [448, 512).
TINY_VISION = dict(architecture="mobilenetv5_base", hidden_size=2048, vocab_offset=384, vocab_size=64)
TINY_AUDIO = dict(hidden_size=32, conf_num_attention_heads=2, conf_num_hidden_layers=1, sscp_conv_channel_size=[8, 4],
                  vocab_offset=448, vocab_size=64)
TINY_MEDIA_TOKENS = dict(boi_token_id=250, eoi_token_id=384, image_token_id=385,
                         boa_token_id=251, eoa_token_id=448, audio_token_id=449)


def randomize(model: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values: the reference zero-initialises some, which would hide bugs.

    scale 0.3 makes every term matter (and the model chaotic); a small scale gives a well-conditioned model
    like a trained one, for precision comparisons."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(noise + 1.0 if p.dim() == 1 and "norm" in name else noise)
    return model.eval()


def text_config(name: str) -> dict:
    return {**COMMON, **TEXT_CONFIGS[name]}


VISION_SCALE = 0.05


def build_reference(name: str, seed: int = 0, scale: float = 0.3):
    """The reference model (transformers) for one tiny config, randomised."""
    from transformers import (Gemma3nConfig, Gemma3nForCausalLM, Gemma3nForConditionalGeneration,
                              Gemma3nTextConfig)
    if name == "multimodal":
        cfg = Gemma3nConfig(text_config=text_config(name), audio_config=TINY_AUDIO, vision_config=TINY_VISION,
                            **TINY_MEDIA_TOKENS)
        model = randomize(Gemma3nForConditionalGeneration(cfg), seed, scale)
        # The vision tower is dozens of blocks deep: at the text's scale it is chaotic (its own float32 and float64
        # outputs differ by 100%), which only bit-identical kernels could match. A small scale conditions it like a
        # trained tower, so the comparisons test the arithmetic, not the order of float32 additions.
        randomize(model.model.vision_tower, seed + 1, VISION_SCALE)
        return model
    return randomize(Gemma3nForCausalLM(Gemma3nTextConfig(**text_config(name))), seed, scale)


def save_reference(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


# The tiny multimodal model's control and media tokens, at the ids its config names.
TINY_SPECIAL_TOKENS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
    TINY_MEDIA_TOKENS["boi_token_id"]: "<start_of_image>", TINY_MEDIA_TOKENS["boa_token_id"]: "<start_of_audio>",
    TINY_MEDIA_TOKENS["eoi_token_id"]: "<end_of_image>", TINY_MEDIA_TOKENS["image_token_id"]: "<image_soft_token>",
    TINY_MEDIA_TOKENS["eoa_token_id"]: "<end_of_audio>", TINY_MEDIA_TOKENS["audio_token_id"]: "<audio_soft_token>"}


def write_tiny_tokenizer(folder: Path, vocab_size: int = 512, special: dict | None = None,
                         words: dict | None = None) -> None:
    """A word-level vocabulary ("w17" is id 17) whose control and media tokens (`special`, default: the tiny
    multimodal model's) sit at their ids, with the Gemma 3n chat template; `words` names other ids as plain
    words."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    from gemma3n.processor.chat import GEMMA3N_CHAT_TEMPLATE
    special = special or TINY_SPECIAL_TOKENS
    names = {**(words or {}), **special}
    vocab = {names.get(i, f"w{i}"): i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(special[i], special=True) for i in sorted(special)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": GEMMA3N_CHAT_TEMPLATE}))
