"""config.json parsing: both layouts, presets, derived values, clear errors."""
import json
from dataclasses import replace

import pytest

from gemma3n.config import E2B, E4B, ConfigError, ModelConfig, TextConfig

S, F = "sliding_attention", "full_attention"


def released_e2b_config() -> dict:
    """The shape of the released google/gemma-3n-E2B-it config.json (transformers 4.53 era keys)."""
    text = {
        "model_type": "gemma3n_text", "hidden_size": 2048, "num_hidden_layers": 30, "intermediate_size": [8192] * 30,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "vocab_size": 262400,
        "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256, "num_kv_shared_layers": 10,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 20, "laurel_rank": 64, "altup_num_inputs": 4,
        "altup_active_idx": 0, "altup_coef_clip": 120.0, "altup_correct_scale": True, "altup_lr_multiplier": 1.0,
        "sliding_window": 512, "layer_types": [F if (i + 1) % 5 == 0 else S for i in range(30)],
        "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None,
        "query_pre_attn_scalar": 256, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "final_logit_softcapping": 30.0, "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "bfloat16",
    }
    return {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text,
            "vision_config": {"architecture": "mobilenetv5_300m_enc", "hidden_size": 2048},
            "audio_config": {"hidden_size": 1536}, "eos_token_id": [1, 106], "image_token_id": 262145,
            "audio_token_id": 262273, "boi_token_id": 255999, "eoi_token_id": 262144}


def test_released_layout_parses_to_the_e2b_preset():
    cfg = ModelConfig.from_dict(released_e2b_config())
    assert cfg.family == "gemma3n" and cfg.eos_token_id == (1, 106)
    assert replace(cfg.text, eos_token_id=E2B.eos_token_id) == E2B  # the stop ids live at the top level here
    assert cfg.vision["architecture"] == "mobilenetv5_300m_enc"


def test_text_only_layout_and_new_rope_parameters():
    data = released_e2b_config()["text_config"]
    del data["rope_theta"], data["rope_local_base_freq"]
    data["rope_parameters"] = {F: {"rope_type": "default", "rope_theta": 5e5}, S: {"rope_type": "default",
                                                                                  "rope_theta": 2e4}}
    cfg = ModelConfig.from_dict(data)
    assert cfg.family == "gemma3n" and cfg.vision is None
    assert (cfg.text.rope_theta, cfg.text.rope_local_base_freq) == (5e5, 2e4)


def test_kv_sharing_follows_the_last_layer_of_each_type():
    # E2B: sliding readers use layer 18, global readers layer 19; E4B the same (first shared layer 20 in both)
    for preset in (E2B, E4B):
        assert preset.first_shared_layer == 20
        producers = preset.kv_producer
        for i, kind in enumerate(preset.layer_types):
            expected = i if i < 20 else (19 if kind == F else 18)
            assert producers[i] == expected
    assert E2B.num_kv_slots == 20


def test_fields_are_honoured_as_given_not_assumed():
    data = dict(released_e2b_config()["text_config"], num_hidden_layers=6, intermediate_size=[1, 2, 3, 4, 5, 6],
                layer_types=[S, S, F, F, S, F], activation_sparsity_pattern=[0.0, 0.5, 0, 0, 0, 0],
                num_kv_shared_layers=3)
    cfg = TextConfig.from_dict(data)
    assert cfg.intermediate_size == (1, 2, 3, 4, 5, 6)
    assert cfg.kv_producer == (0, 1, 2, 2, 1, 2)
    assert cfg.activation_sparsity_pattern[1] == 0.5


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "field 'hidden_size' is missing"),
    ({"hidden_size": "big"}, "field 'hidden_size' should be int"),
    ({"num_hidden_layers": 0}, "field 'num_hidden_layers' must be a positive integer"),
    ({"intermediate_size": [8192] * 29}, "field 'intermediate_size' has 29 entries"),
    ({"layer_types": ["banana"] * 30}, "unknown type 'banana'"),
    ({"num_kv_shared_layers": 30}, "num_kv_shared_layers"),
    ({"layer_types": [S] * 25 + [F] * 5}, "no layer before 20 has that type"),
])
def test_invalid_text_fields_name_the_field_and_file(tmp_path, change, message):
    data = released_e2b_config()
    data["text_config"].update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=message) as e:
        ModelConfig.from_file(path)
    assert "\n" not in str(e.value)


def test_unknown_architecture_and_bad_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match=r"config.json: model_type 'llama' is not supported"):
        ModelConfig.from_file(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_file(path)
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path / "missing.json")


def test_config_agrees_with_transformers_defaults():
    """What transformers derives from a sparse config (defaults, layer types, sparsity) we derive too."""
    from transformers import Gemma3nTextConfig
    ref = Gemma3nTextConfig(num_hidden_layers=12, intermediate_size=64, num_kv_shared_layers=4)
    ours = TextConfig.from_dict({k: v for k, v in ref.to_dict().items() if k in (
        "num_hidden_layers", "intermediate_size", "num_kv_shared_layers", "hidden_size", "vocab_size",
        "num_attention_heads", "num_key_value_heads", "head_dim")})
    assert list(ours.layer_types) == ref.layer_types
    assert list(ours.activation_sparsity_pattern) == ref.activation_sparsity_pattern
    assert list(ours.intermediate_size) == ref.intermediate_size
    modes = ref.kv_sharing_modes
    assert [i for i, m in enumerate(modes) if m == "reuse"] == list(range(ours.first_shared_layer, 12))
