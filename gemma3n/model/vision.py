"""Gemma 3n's vision tower: timm's MobileNet-V5 encoder, its architecture written as data tables.

`build_vision_tower(vision_config)` builds the tower that the checkpoint's `model.vision_tower.timm_model.*`
tensors load into by a prefix strip; `forward(pixel_values (N, 3, H, W)) -> (N, 256, 2048)` soft tokens, i.e. the
reference's `last_hidden_state` flattened and transposed (before get_image_features' scaling and embed_vision)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .vision_blocks import (ConvNorm, EdgeResidual, MobileAttention, MultiScaleFusionAdapter,
                            UniversalInvertedResidual)


@dataclass(frozen=True)
class BlockSpec:
    """One trunk block. kind "er": `kernel` is the expansion conv; "uir": `dw_start` / `kernel` are the
    depthwise start / mid kernels (0 = absent); "mqa": `kernel` is the key/value down-sampling conv."""
    kind: str
    out: int
    stride: int = 1
    exp_ratio: float = 1.0
    kernel: int = 0
    dw_start: int = 0
    heads: int = 0
    head_dim: int = 0
    kv_stride: int = 1


def er(out: int, kernel: int, stride: int, exp_ratio: float) -> BlockSpec:
    return BlockSpec("er", out, stride, exp_ratio, kernel)


def uir(out: int, dw_start: int, dw_mid: int, stride: int, exp_ratio: float) -> BlockSpec:
    return BlockSpec("uir", out, stride, exp_ratio, dw_mid, dw_start)


def mqa(out: int, heads: int, head_dim: int, kv_stride: int) -> BlockSpec:
    return BlockSpec("mqa", out, kernel=3, heads=heads, head_dim=head_dim, kv_stride=kv_stride)


# timm mobilenetv5.py `_gen_mobilenet_v5` (the "mobilenetv5_300m*" branch): 3 / 5 / 37 / 39 blocks.
STAGES_300M = (
    (er(128, 3, 2, 4), er(128, 3, 1, 4), er(128, 3, 1, 4)),
    (uir(256, 3, 5, 2, 6), uir(256, 5, 0, 1, 4), uir(256, 3, 0, 1, 4), uir(256, 5, 0, 1, 4), uir(256, 3, 0, 1, 4)),
    (uir(640, 5, 5, 2, 6), *[uir(640, 5, 0, 1, 4)] * 7, uir(640, 0, 0, 1, 1),
     *[mqa(640, 12, 64, 2), uir(640, 0, 0, 1, 2)] * 14),
    (uir(1280, 5, 5, 2, 6), *[mqa(1280, 16, 96, 1), uir(1280, 0, 0, 1, 2)] * 19),
)
# The "mobilenetv5_base" branch: 3 / 5 / 16 / 15 blocks. Its MQA strings say "s2", but timm keeps a stride only on
# the first block of a stage, so those blocks run at stride 1 with kv_stride 1.
STAGES_BASE = (
    STAGES_300M[0],
    STAGES_300M[1],
    (uir(512, 5, 5, 2, 6), uir(512, 5, 0, 1, 4), uir(512, 5, 0, 1, 4), uir(512, 0, 0, 1, 1),
     *[mqa(512, 8, 64, 1), uir(512, 0, 0, 1, 2)] * 6),
    (uir(1024, 5, 5, 2, 6), *[mqa(1024, 16, 64, 1), uir(1024, 0, 0, 1, 2)] * 7),
)


@dataclass(frozen=True)
class VisionArchitecture:
    stages: tuple
    same_padding: bool  # TF "SAME" padding (the encoder variant) or timm's default symmetric padding
    stem_channels: int = 64
    out_channels: int = 2048
    msfa_stages: int = 2  # the MSFA fuses the outputs of the last two stages
    output_resolution: int = 16  # 16 x 16 = 256 soft tokens per image


# The names timm registers (Gemma3nVisionConfig.architecture). Only the encoder variant uses "SAME" padding.
ARCHITECTURES = {
    "mobilenetv5_300m_enc": VisionArchitecture(STAGES_300M, same_padding=True),
    "mobilenetv5_300m": VisionArchitecture(STAGES_300M, same_padding=False),
    "mobilenetv5_base": VisionArchitecture(STAGES_BASE, same_padding=False),
}


def build_block(spec: BlockSpec, in_ch: int, stride: int, same_padding: bool) -> nn.Module:
    """One block of the table; every block carries a layer scale (the encoder's layer_scale_init_value 1e-5)."""
    if spec.kind == "er":
        return EdgeResidual(in_ch, spec.out, spec.kernel, stride, spec.exp_ratio, same_padding)
    if spec.kind == "uir":
        return UniversalInvertedResidual(in_ch, spec.out, spec.dw_start, spec.kernel, stride, spec.exp_ratio,
                                         same_padding=same_padding)
    if spec.kind == "mqa":
        return MobileAttention(in_ch, spec.out, spec.heads, spec.head_dim, spec.kernel, spec.kv_stride,
                               same_padding=same_padding)
    raise ValueError(f"unknown vision block kind {spec.kind!r}")


class MobileNetV5Encoder(nn.Module):
    """Stem -> stages of blocks -> multi-scale fusion of the last stages -> (N, 2048, 16, 16)."""

    def __init__(self, arch: VisionArchitecture):
        super().__init__()
        self.conv_stem = ConvNorm(3, arch.stem_channels, 3, stride=2, bias=True, same_padding=arch.same_padding)
        stages, in_ch, stage_channels = [], arch.stem_channels, [arch.stem_channels]
        for specs in arch.stages:
            blocks = []
            for i, spec in enumerate(specs):
                # Only a stage's first block may downsample (timm's builder resets the others to stride 1).
                blocks.append(build_block(spec, in_ch, spec.stride if i == 0 else 1, arch.same_padding))
                in_ch = spec.out
            stages.append(nn.Sequential(*blocks))
            stage_channels.append(in_ch)
        self.blocks = nn.Sequential(*stages)
        self.msfa_stages = arch.msfa_stages
        self.msfa = MultiScaleFusionAdapter(sum(stage_channels[-arch.msfa_stages:]), arch.out_channels,
                                            arch.output_resolution)

    def forward(self, pixel_values: Tensor) -> Tensor:  # (N, 3, H, W) -> (N, S, C)
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (N, 3, H, W) RGB images in [0, 1], got shape "
                             f"{tuple(pixel_values.shape)}; use gemma3n.processor.image.ImageProcessor to make them")
        # Channels last: oneDNN convolves NHWC maps without reordering them around every conv, and each pixel's
        # channels are one row for the fused norms (vision_blocks.RMSNorm2d).
        x = self.conv_stem(pixel_values.to(self.conv_stem.conv.weight.dtype).contiguous(
            memory_format=torch.channels_last))
        features = []
        for stage in self.blocks:
            x = stage(x)
            features.append(x)
        x = self.msfa(features[-self.msfa_stages:])  # (N, C, 16, 16)
        return x.flatten(2).transpose(1, 2)  # (N, 256, C), token = row * 16 + col


def build_vision_tower(vision_config: Mapping[str, Any]) -> MobileNetV5Encoder:
    """The tower named by config.json's "vision_config" (its "architecture", default mobilenetv5_300m_enc)."""
    name = vision_config.get("architecture", "mobilenetv5_300m_enc")
    if name not in ARCHITECTURES:
        raise ValueError(f"vision_config.architecture {name!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}. Check the checkpoint's config.json.")
    if vision_config.get("model_args"):
        raise ValueError(f"vision_config.model_args {vision_config['model_args']!r} is not supported: the tower is "
                         f"built from the architecture table alone. Remove model_args from config.json.")
    return MobileNetV5Encoder(ARCHITECTURES[name])
