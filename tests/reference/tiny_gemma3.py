"""Seeded tiny Gemma 3 image checkpoints (`Gemma3ForConditionalGeneration`: a tiny text decoder and a small SigLIP),
written by transformers' own save_pretrained, and a word-level tokenizer with Gemma 3's media tokens and chat
template."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .tiny import randomize

S, F = "sliding_attention", "full_attention"
VOCAB = 320
MEDIA = dict(boi_token_index=300, eoi_token_index=301, image_token_index=302)
# A sliding window (8) much shorter than an image block (16 tokens), so the sliding layers' AND-window rule matters.
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, layer_types=[S, F, S, F], sliding_window=8,
            max_position_embeddings=4096, rms_norm_eps=1e-6, final_logit_softcapping=None,
            rope_parameters={F: {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                             S: {"rope_type": "default", "rope_theta": 10_000.0}})
# 64 px, 8 px patches: an 8 x 8 grid pooled 2 x 2 to 16 soft tokens per image.
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=64,
              patch_size=8, layer_norm_eps=1e-6, vision_use_head=False)
TOKENS_PER_IMAGE = 16

GEMMA3_CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}{%- set first_user_prefix = "" -%}{%- set loop_messages = messages -%}{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
{%- endif -%}
{%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}
{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
{%- if message['content'] is string -%}{{ message['content'] | trim }}
{%- elif message['content'] is iterable -%}
{%- for item in message['content'] -%}
{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}
{%- endif -%}
{%- endfor -%}
{%- else -%}{{ raise_exception("Invalid content type") }}{%- endif -%}
{{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{'<start_of_turn>model\n'}}{%- endif -%}
"""

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>",
           MEDIA["boi_token_index"]: "<start_of_image>", MEDIA["eoi_token_index"]: "<end_of_image>",
           MEDIA["image_token_index"]: "<image_soft_token>"}


def build_gemma3_reference(seed: int = 0, scale: float = 0.1, vision: dict | None = None,
                           tokens_per_image: int = TOKENS_PER_IMAGE):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig
    cfg = Gemma3Config(text_config=Gemma3TextConfig(**TEXT), vision_config=SiglipVisionConfig(**(vision or VISION)),
                       mm_tokens_per_image=tokens_per_image, **MEDIA)
    cfg.text_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize(Gemma3ForConditionalGeneration(cfg), seed, scale)


def write_gemma3_tokenizer(folder: Path, image_size: int = 64) -> None:
    """A word-level vocabulary ("w17" is id 17), Gemma 3's media tokens at the tiny config's ids, Gemma 3's chat
    template, and a preprocessor_config.json like the released one at the tiny tower's image size."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {SPECIAL.get(i, f"w{i}"): i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(SPECIAL[i], special=True) for i in sorted(SPECIAL)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
        "chat_template": GEMMA3_CHAT_TEMPLATE,
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                 "image_token": "<image_soft_token>"}}))
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(image_size)))


def preprocessor_config(image_size: int = 896, **pan_and_scan) -> dict:
    """The released Gemma 3 preprocessor_config.json at another image size (pan & scan keys null unless given)."""
    return {"image_processor_type": "Gemma3ImageProcessor", "do_convert_rgb": None, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "resample": 2, "rescale_factor": 1 / 255, "size": {"height": image_size, "width": image_size},
            "do_pan_and_scan": None, "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
            "pan_and_scan_min_ratio_to_activate": None, **pan_and_scan}


def image_run(count: int = TOKENS_PER_IMAGE) -> list[int]:
    return [MEDIA["boi_token_index"]] + [MEDIA["image_token_index"]] * count + [MEDIA["eoi_token_index"]]
