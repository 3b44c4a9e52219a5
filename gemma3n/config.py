"""Model configuration: frozen dataclasses parsed from a Hugging Face `config.json`, plus E2B / E4B presets.

Every architecture number comes from the file (or a preset). Where transformers fills a field by a rule when it
is absent (layer_types, activation_sparsity_pattern, ...), the same rule is applied here; a field that is present
is honoured as given. A missing required field or a value of the wrong kind raises `ConfigError` naming the field
and the file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)


class ConfigError(ValueError):
    """A config.json that cannot describe a model we run."""


class _Fields:
    """Reads typed fields from one config dict; every error names the field and the file."""

    def __init__(self, data: Mapping[str, Any], source: str):
        self.data, self.source = data, source

    def _fail(self, key: str, what: str) -> ConfigError:
        return ConfigError(f"{self.source}: field '{key}' {what}")

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        value = self.data.get(key)
        if value is None:
            if default is ...:
                raise self._fail(key, "is missing; it is required to build the model")
            return default
        return self._check(key, value, kind)

    def _check(self, key: str, value: Any, kind: type) -> Any:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool, dict) and isinstance(value, kind):
            return value
        raise self._fail(key, f"should be {kind.__name__}, got {value!r}")

    def positive(self, key: str, default: Any = ...) -> int:
        value = self.get(key, int, default)
        if value <= 0:
            raise self._fail(key, f"must be a positive integer, got {value}")
        return value

    def per_layer(self, key: str, kind: type, n: int, default: Any = ...) -> tuple:
        """A per-layer list, or one scalar repeated for every layer (as transformers accepts)."""
        value = self.data.get(key)
        if value is None:
            if default is ...:
                raise self._fail(key, "is missing; it is required to build the model")
            value = default
        if not isinstance(value, (list, tuple)):
            value = [value] * n
        if len(value) != n:
            raise self._fail(key, f"has {len(value)} entries but num_hidden_layers is {n}")
        return tuple(self._check(key, v, kind) for v in value)

    def eos_ids(self, key: str = "eos_token_id") -> tuple[int, ...]:
        value = self.data.get(key)
        if value is None:
            return ()
        values = value if isinstance(value, (list, tuple)) else [value]
        return tuple(self._check(key, v, int) for v in values)


def _default_layer_types(n: int, period: int) -> list[str]:
    """Transformers' default: every `period`-th layer is global, the others slide."""
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]


def _rope_thetas(f: _Fields, full_default: float, sliding_default: float) -> tuple[float, float, dict]:
    """(full theta, sliding theta, full-attention scaling dict) from either config layout.

    transformers >= 5 writes `rope_parameters: {full_attention: {...}, sliding_attention: {...}}`; the released
    checkpoints carry the legacy keys `rope_theta`, `rope_local_base_freq` and `rope_scaling`.
    """
    params = f.get("rope_parameters", dict, None)
    if params is not None and (FULL in params or SLIDING in params):
        full = params.get(FULL) or {}
        sliding = params.get(SLIDING) or {}
        theta_full = float(full.get("rope_theta", f.get("rope_theta", float, full_default)))
        theta_sliding = float(sliding.get("rope_theta", f.get("rope_local_base_freq", float, sliding_default)))
        return theta_full, theta_sliding, dict(full)
    scaling = f.get("rope_scaling", dict, None) or (params or {})
    theta_full = f.get("rope_theta", float, float(scaling.get("rope_theta", full_default)))
    return theta_full, f.get("rope_local_base_freq", float, sliding_default), dict(scaling)


def _rope_linear_factor(scaling: Mapping[str, Any], source: str) -> float:
    """Gemma 3 scales global-layer positions linearly on the larger models; nothing else is used by Gemma."""
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(scaling["factor"])
    raise ConfigError(f"{source}: rope type '{kind}' is not supported (only 'default' and 'linear')")


@dataclass(frozen=True)
class TextConfig:
    """The Gemma 3n text decoder (`Gemma3nTextConfig`)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: tuple[int, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    activation_sparsity_pattern: tuple[float, ...]
    num_kv_shared_layers: int
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    sliding_window: int = 512
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 32_768
    laurel_rank: int = 64
    altup_num_inputs: int = 4
    altup_active_idx: int = 0
    altup_correct_scale: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        for name in ("intermediate_size", "layer_types", "activation_sparsity_pattern"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"config: field '{name}' has {len(getattr(self, name))} entries, expected {n}")
        bad = [t for t in self.layer_types if t not in _LAYER_TYPES]
        if bad:
            raise ConfigError(f"config: field 'layer_types' has unknown type {bad[0]!r}; expected one of {_LAYER_TYPES}")
        if not 0 <= self.num_kv_shared_layers < n:
            raise ConfigError(f"config: field 'num_kv_shared_layers' = {self.num_kv_shared_layers} must be in [0, {n})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config: num_attention_heads must be a multiple of num_key_value_heads")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"config: field 'hidden_activation' = {self.hidden_activation!r} is not supported")
        self.kv_producer  # validates that every shared layer has a producer

    @property
    def first_shared_layer(self) -> int:
        """Index of the first layer that reads another layer's K/V instead of computing its own."""
        return self.num_hidden_layers - self.num_kv_shared_layers

    @property
    def kv_producer(self) -> tuple[int, ...]:
        """For each layer, the layer whose K/V it attends to (itself for non-shared layers).

        A shared layer uses the last non-shared layer of its own attention type.
        """
        first = self.first_shared_layer
        last_of_type: dict[str, int] = {}
        for i in range(first):
            last_of_type[self.layer_types[i]] = i
        producers = []
        for i, kind in enumerate(self.layer_types):
            if i < first:
                producers.append(i)
            elif kind in last_of_type:
                producers.append(last_of_type[kind])
            else:
                raise ConfigError(
                    f"config: layer {i} ({kind}) shares K/V but no layer before {first} has that type to produce it"
                )
        return tuple(producers)

    @property
    def num_kv_slots(self) -> int:
        """Cache slots: one per non-shared layer; slot i belongs to layer i, and `kv_producer` maps readers."""
        return self.first_shared_layer

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "TextConfig":
        f = _Fields(data, source)
        n = f.positive("num_hidden_layers")
        layer_types = f.per_layer("layer_types", str, n, _default_layer_types(n, 5))
        default_sparsity = [0.95] * 10 + [0.0] * (n - 10) if n > 10 else [0.0] * n
        theta_full, theta_sliding, _ = _rope_thetas(f, 1_000_000.0, 10_000.0)
        softcap = f.get("final_logit_softcapping", float, None)
        eos = f.eos_ids() or (1,)
        return cls(
            vocab_size=f.positive("vocab_size"),
            hidden_size=f.positive("hidden_size"),
            num_hidden_layers=n,
            intermediate_size=f.per_layer("intermediate_size", int, n),
            num_attention_heads=f.positive("num_attention_heads"),
            num_key_value_heads=f.positive("num_key_value_heads"),
            head_dim=f.positive("head_dim"),
            layer_types=layer_types,
            activation_sparsity_pattern=f.per_layer("activation_sparsity_pattern", float, n, default_sparsity),
            num_kv_shared_layers=f.get("num_kv_shared_layers", int, 0),
            vocab_size_per_layer_input=f.positive("vocab_size_per_layer_input", 262_144),
            hidden_size_per_layer_input=f.positive("hidden_size_per_layer_input", 256),
            sliding_window=f.positive("sliding_window", 512),
            rope_theta=theta_full,
            rope_local_base_freq=theta_sliding,
            rms_norm_eps=f.get("rms_norm_eps", float, 1e-6),
            final_logit_softcapping=softcap,
            max_position_embeddings=f.positive("max_position_embeddings", 32_768),
            laurel_rank=f.positive("laurel_rank", 64),
            altup_num_inputs=f.positive("altup_num_inputs", 4),
            altup_active_idx=f.get("altup_active_idx", int, 0),
            altup_correct_scale=f.get("altup_correct_scale", bool, True),
            hidden_activation=f.get("hidden_activation", str, "gelu_pytorch_tanh"),
            pad_token_id=f.get("pad_token_id", int, 0),
            bos_token_id=f.get("bos_token_id", int, 2),
            eos_token_id=eos,
        )


def _preset(layers: int, width: int, shared: int) -> TextConfig:
    return TextConfig(
        vocab_size=262_400,
        hidden_size=2048,
        num_hidden_layers=layers,
        intermediate_size=(width,) * layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=256,
        layer_types=tuple(_default_layer_types(layers, 5)),
        activation_sparsity_pattern=(0.95,) * 10 + (0.0,) * (layers - 10),
        num_kv_shared_layers=shared,
        eos_token_id=(1, 106),
    )


E2B = _preset(30, 8192, 10)
E4B = _preset(35, 16384, 15)


# transformers' Gemma3TextConfig defaults for the fields that shape the model.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256)


@dataclass(frozen=True)
class Gemma3TextConfig:
    """The Gemma 3 text decoder (`Gemma3TextConfig`): a plain pre/post-norm transformer."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    query_pre_attn_scalar: float
    sliding_window: int = 4096
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    max_position_embeddings: int = 131_072
    hidden_activation: str = "gelu_pytorch_tanh"
    pad_token_id: int = 0
    bos_token_id: int = 2
    eos_token_id: tuple[int, ...] = (1,)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "Gemma3TextConfig":
        f = _Fields(data, source)
        # Absent fields take Gemma3TextConfig's defaults, as transformers fills them: the released 4B / 12B / 27B
        # config.json files leave out e.g. vocab_size, the head counts (4B) and head_dim (4B, 12B).
        d = GEMMA3_TEXT_DEFAULTS
        n = f.positive("num_hidden_layers", d["num_hidden_layers"])
        period = f.get("sliding_window_pattern", int, 6)
        theta_full, theta_sliding, scaling = _rope_thetas(f, 1_000_000.0, 10_000.0)
        return cls(
            vocab_size=f.positive("vocab_size", d["vocab_size"]),
            hidden_size=f.positive("hidden_size", d["hidden_size"]),
            num_hidden_layers=n,
            intermediate_size=f.positive("intermediate_size", d["intermediate_size"]),
            num_attention_heads=f.positive("num_attention_heads", d["num_attention_heads"]),
            num_key_value_heads=f.positive("num_key_value_heads", d["num_key_value_heads"]),
            head_dim=f.positive("head_dim", d["head_dim"]),
            layer_types=f.per_layer("layer_types", str, n, _default_layer_types(n, period)),
            query_pre_attn_scalar=f.get("query_pre_attn_scalar", float, float(d["query_pre_attn_scalar"])),
            sliding_window=f.positive("sliding_window", 4096),
            rope_theta=theta_full,
            rope_local_base_freq=theta_sliding,
            rope_scaling_factor=_rope_linear_factor(scaling, source),
            rms_norm_eps=f.get("rms_norm_eps", float, 1e-6),
            final_logit_softcapping=f.get("final_logit_softcapping", float, None),
            attn_logit_softcapping=f.get("attn_logit_softcapping", float, None),
            max_position_embeddings=f.positive("max_position_embeddings", 131_072),
            hidden_activation=f.get("hidden_activation", str, "gelu_pytorch_tanh"),
            pad_token_id=f.get("pad_token_id", int, 0),
            bos_token_id=f.get("bos_token_id", int, 2),
            eos_token_id=f.eos_ids() or (1,),
        )


# model_type in config.json -> (architecture family, whether the text config is nested under text_config)
_MODEL_TYPES = {
    "gemma3n": ("gemma3n", True),
    "gemma3n_text": ("gemma3n", False),
    "gemma3": ("gemma3", True),
    "gemma3_text": ("gemma3", False),
}


@dataclass(frozen=True)
class ModelConfig:
    """A whole checkpoint: the text config plus the towers' raw sections and the multimodal token ids.

    The vision and audio sections are kept as parsed JSON until their encoders read them.
    """

    family: str  # "gemma3n" or "gemma3"
    model_type: str
    text: Any  # TextConfig or Gemma3TextConfig
    vision: Mapping[str, Any] | None = None
    audio: Mapping[str, Any] | None = None
    eos_token_id: tuple[int, ...] = (1,)
    image_token_id: int = 262_145
    audio_token_id: int = 262_273
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    vision_soft_tokens_per_image: int = 256
    audio_soft_tokens_per_image: int = 188
    source: str = field(default="config.json", compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object at the top level")
        model_type = data.get("model_type")
        if model_type not in _MODEL_TYPES:
            known = ", ".join(sorted(_MODEL_TYPES))
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported (supported: {known})")
        family, nested = _MODEL_TYPES[model_type]
        text_data = data.get("text_config") if nested else data
        if not isinstance(text_data, Mapping):
            raise ConfigError(f"{source}: field 'text_config' is missing; a {model_type} config nests its decoder there")
        text_cls = TextConfig if family == "gemma3n" else Gemma3TextConfig
        text = text_cls.from_dict(text_data, source)
        f = _Fields(data, source)
        eos = f.eos_ids() or text.eos_token_id
        ids = {k: f.get(k, int, getattr(cls, k)) for k in (
            "image_token_id", "audio_token_id", "boi_token_id", "eoi_token_id", "boa_token_id", "eoa_token_id",
            "vision_soft_tokens_per_image", "audio_soft_tokens_per_image")}
        if family == "gemma3":
            ids["image_token_id"] = f.get("image_token_index", int, 262_144)
            ids["vision_soft_tokens_per_image"] = f.get("mm_tokens_per_image", int, 256)
            ids["boi_token_id"] = f.get("boi_token_index", int, 255_999)  # Gemma3Config's names and defaults
            ids["eoi_token_id"] = f.get("eoi_token_index", int, 256_000)
        return cls(
            family=family, model_type=model_type, text=text,
            vision=data.get("vision_config") if nested else None,
            audio=data.get("audio_config") if nested else None,
            eos_token_id=eos, source=source, **ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: not found; a checkpoint folder needs its config.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))


def embed_scale(hidden_size: int) -> float:
    """Token embeddings are multiplied by sqrt(hidden_size) in every Gemma."""
    return math.sqrt(hidden_size)
