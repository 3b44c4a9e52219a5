"""Gemma 3's vision side: the SigLIP vision transformer and the multi-modal projector.

`SiglipVisionTower(cfg)(pixel_values (N, 3, S, S)) -> (N, (S / patch)^2, C)`: the reference's
`vision_tower(...).last_hidden_state` (patch embedding + learned positions, pre-norm encoder layers, final
LayerNorm; Gemma 3 uses no pooling head). Module names are the checkpoint's under `vision_tower.vision_model.`, so the
tower loads by a prefix strip.

`MultiModalProjector(cfg, text_hidden, tokens_per_image)`: the patch grid average-pooled to
`mm_tokens_per_image` (16 x 16 = 256 for 896 / 14 = 64 patches a side: 4 x 4 windows), the soft-embedding RMSNorm
(Gemma's 1 + w, float32 inside) and a bias-free projection into the decoder's width, stored as a (C, D) matrix
(`mm_input_projection_weight`, multiplied from the right).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ConfigError
from ..siglip_config import SiglipConfig
from .layers import RMSNorm


class Embeddings(nn.Module):
    """Non-overlapping patches (a stride-`patch` conv) plus one learned position vector per patch."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side ** 2, cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:  # (N, 3, S, S) -> (N, P, C), patch = row * side + col
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)
        # a module call, not .weight: the table may be quantised (gemma3n.quant.quantize_module)
        positions = self.position_embedding(torch.arange(patches.shape[1], device=patches.device))
        return patches + positions.to(patches.dtype)[None]


class Attention(nn.Module):
    """Full (bidirectional) multi-head attention with biased projections, scale head_dim^-0.5."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, d // cfg.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class EncoderLayer(nn.Module):
    """x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SiglipVisionTower(nn.Module):
    """SigLIP's vision transformer as Gemma 3 uses it: (N, 3, S, S) pixels normalised to [-1, 1] -> (N, P, C)."""

    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        cfg = self.config
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be (N, {', '.join(map(str, want))}) images, got shape "
                             f"{tuple(pixel_values.shape)}; use gemma3n.processor.gemma3_image.Gemma3ImageProcessor")
        return self.post_layernorm(self.encoder(self.embeddings(pixel_values)))


def build_siglip_tower(vision_config: Mapping[str, Any]) -> SiglipVisionTower:
    return SiglipVisionTower(SiglipConfig.from_dict(vision_config))


class MultiModalProjector(nn.Module):
    """Tower tokens (N, P, C) -> (N, mm_tokens_per_image, D) soft tokens for the decoder."""

    def __init__(self, cfg: SiglipConfig, text_hidden: int, tokens_per_image: int, source: str = "config.json"):
        super().__init__()
        side = math.isqrt(tokens_per_image)
        if side * side != tokens_per_image or cfg.patches_per_side % side:
            raise ConfigError(f"{source}: mm_tokens_per_image {tokens_per_image} must be a square whose side divides "
                              f"the {cfg.patches_per_side} patches a side of the vision tower")
        self.patches_per_side, self.kernel = cfg.patches_per_side, cfg.patches_per_side // side
        self.mm_input_projection_weight = nn.Parameter(torch.zeros(cfg.hidden_size, text_hidden))
        self.mm_soft_emb_norm = RMSNorm(cfg.hidden_size, cfg.layer_norm_eps, offset=1.0)

    def forward(self, features: Tensor) -> Tensor:
        n, p, c = features.shape
        if p != self.patches_per_side ** 2:
            raise ValueError(f"the vision tower gave {p} tokens per image, expected {self.patches_per_side ** 2}")
        grid = features.transpose(1, 2).reshape(n, c, self.patches_per_side, self.patches_per_side)
        pooled = F.avg_pool2d(grid, self.kernel, self.kernel).flatten(2).transpose(1, 2)  # (N, S, C)
        normed = self.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).to(features.dtype)
