"""The released Gemma 3 configurations (1B text only, 4B, 12B, 27B with the SigLIP tower), written here from the
published config.json files: they parse, give the published architecture (layers, heads, RoPE: linear factor 8 on
the global layers of the 128K models, none on the 32K 1B), and every tensor of the model we build has the shape of
transformers' model built from the same file (both on the meta device: no memory)."""
from __future__ import annotations

import pytest
import torch

from gemma3n.config import FULL, SLIDING, ModelConfig
from gemma3n.model.gemma3 import Gemma3CausalLM

S, F = SLIDING, FULL
SIGLIP_896 = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}
LINEAR_8 = {"factor": 8.0, "rope_type": "linear"}


def image_model(text: dict) -> dict:
    return {"architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
            "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02,
            "mm_tokens_per_image": 256, "model_type": "gemma3", "torch_dtype": "bfloat16",
            "text_config": {"model_type": "gemma3_text", "rope_scaling": LINEAR_8, "sliding_window": 1024, **text},
            "vision_config": SIGLIP_896}


RELEASED = {
    "1b": {"architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attn_logit_softcapping": None,
           "bos_token_id": 2, "eos_token_id": [1, 106], "final_logit_softcapping": None, "head_dim": 256,
           "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "intermediate_size": 6912,
           "max_position_embeddings": 32768, "model_type": "gemma3_text", "num_attention_heads": 4,
           "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
           "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
           "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16", "vocab_size": 262144},
    "4b": image_model({"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34}),
    "12b": image_model({"hidden_size": 3840, "intermediate_size": 15360, "num_attention_heads": 16,
                        "num_hidden_layers": 48, "num_key_value_heads": 8}),
    "27b": image_model({"head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "num_attention_heads": 32,
                        "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168}),
}
# (layers, heads, kv heads, head_dim, hidden, window, context, global-layer RoPE factor)
PUBLISHED = {"1b": (26, 4, 1, 256, 1152, 512, 32_768, 1.0), "4b": (34, 8, 4, 256, 2560, 1024, 131_072, 8.0),
             "12b": (48, 16, 8, 256, 3840, 1024, 131_072, 8.0), "27b": (62, 32, 16, 128, 5376, 1024, 131_072, 8.0)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_parses_to_the_published_architecture(name):
    cfg = ModelConfig.from_dict(RELEASED[name], f"{name}/config.json")
    t = cfg.text
    layers, heads, kv, head_dim, hidden, window, context, factor = PUBLISHED[name]
    assert (t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.hidden_size) == \
        (layers, heads, kv, head_dim, hidden)
    assert (t.sliding_window, t.max_position_embeddings, t.rope_scaling_factor) == (window, context, factor)
    assert (t.rope_theta, t.rope_local_base_freq) == (1_000_000.0, 10_000.0)
    assert t.layer_types == tuple(F if (i + 1) % 6 == 0 else S for i in range(layers))  # 5 local : 1 global
    assert t.query_pre_attn_scalar == (168 if name == "27b" else 256)
    assert cfg.family == "gemma3" and (cfg.vision is None) == (name == "1b")
    if name != "1b":
        assert (cfg.image_token_id, cfg.vision_soft_tokens_per_image, t.vocab_size) == (262144, 256, 262208)
        assert (cfg.boi_token_id, cfg.eoi_token_id) == (255999, 256000)


def shapes(module: torch.nn.Module, strip: str = "") -> dict[str, tuple]:
    return {k.removeprefix(strip): tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_every_tensor_shape_equals_transformers(name):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_dict(RELEASED[name])
    hf = {k: v for k, v in RELEASED[name].items() if k not in ("architectures", "torch_dtype")}
    with torch.device("meta"):
        ours = shapes(Gemma3CausalLM(cfg.text))
        if name == "1b":
            ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hf))
            want = {k: s for k, s in shapes(ref).items() if k != "lm_head.weight"}
        else:
            from gemma3n.model.gemma3_multimodal import Gemma3Multimodal
            from gemma3n.model.siglip import build_siglip_tower
            ref = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(**hf))
            want = {k.replace("model.language_model.", "model."): s for k, s in shapes(ref).items()
                    if k.startswith("model.language_model.")}
            assert shapes(Gemma3Multimodal(cfg), "multi_modal_projector.") == shapes(ref.model.multi_modal_projector)
            tower_want = {k.removeprefix("vision_model."): s for k, s in shapes(ref.model.vision_tower).items()
                          if "position_ids" not in k}
            assert shapes(build_siglip_tower(cfg.vision)) == tower_want
    assert ours == want
