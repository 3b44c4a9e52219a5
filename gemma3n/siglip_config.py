"""config.json's "vision_config" of a Gemma 3 checkpoint (the SigLIP tower), parsed strictly: the model builds the
tower from it and the processor reads its image size."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .config import ConfigError


@dataclass(frozen=True)
class SiglipConfig:
    """config.json's "vision_config" of a Gemma 3 checkpoint; absent keys take SiglipVisionConfig's defaults."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "config.json") -> "SiglipConfig":
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: field 'vision_config' is missing; a Gemma 3 image checkpoint needs it")
        values = {}
        for name, default in cls.__dataclass_fields__.items():
            value = data.get(name)
            if value is None:
                continue
            if name in ("image_size", "patch_size") and isinstance(value, (list, tuple)):
                if len(value) != 2 or value[0] != value[1]:
                    raise ConfigError(f"{source}: field 'vision_config.{name}' = {value!r}: only square sizes are "
                                      "supported")
                value = value[0]
            kind = type(default.default)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else \
                isinstance(value, kind) and not isinstance(value, bool) if kind is int else isinstance(value, kind)
            if not ok:
                raise ConfigError(f"{source}: field 'vision_config.{name}' should be {kind.__name__}, got {value!r}")
            values[name] = kind(value)
        cfg = cls(**values)
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"{source}: vision_config.hidden_act {cfg.hidden_act!r} is not supported "
                              "(gelu_pytorch_tanh or gelu)")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"{source}: vision_config.hidden_size {cfg.hidden_size} is not a multiple of "
                              f"num_attention_heads {cfg.num_attention_heads}")
        if cfg.image_size % cfg.patch_size:
            raise ConfigError(f"{source}: vision_config.image_size {cfg.image_size} is not a multiple of "
                              f"patch_size {cfg.patch_size}")
        if data.get("vision_use_head"):
            raise ConfigError(f"{source}: vision_config.vision_use_head is true; Gemma 3 uses the patch tokens "
                              "without SigLIP's pooling head. Set it to false.")
        return cfg
