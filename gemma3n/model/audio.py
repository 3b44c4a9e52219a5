"""The Gemma 3n audio tower: a USM-style conformer over log-mel frames, 6.25 output tokens per second.

log-mel (B, T, 128) -> subsample conv projection (two stride-2 convs, each with a cumulative group norm) ->
12 conformer blocks (half FFW, local attention, light conv, half FFW, norm) -> every 4th frame.
Module names follow the checkpoint (`model.audio_tower.` stripped), so loading is a prefix strip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from gemma3n.model.audio_attention import LocalRelativeAttention
from gemma3n.model.layers import RMSNorm, linear_forward, may_write_over

# Most norms of the tower use Gemma3nRMSNorm's default eps, not the config's rms_norm_eps (only the light conv's
# norms read it); the values agree in the released config, but the reference's choice is kept.
_DEFAULT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class AudioConfig:
    """Audio tower architecture, from config.json's "audio_config"."""

    hidden_size: int
    input_feat_size: int
    num_heads: int
    num_layers: int
    chunk_size: int
    context_left: int
    context_right: int
    logit_cap: float
    conv_kernel_size: int
    reduction_factor: int
    residual_weight: float
    gradient_clipping: float
    rms_norm_eps: float
    sscp_channels: tuple[int, ...]
    sscp_kernels: tuple[tuple[int, int], ...]
    sscp_strides: tuple[tuple[int, int], ...]
    sscp_eps: float = 1e-3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config.json audio_config") -> "AudioConfig":
        def need(key: str):
            if key not in d:
                raise ValueError(f"{source}: missing key {key!r} (needed to build the audio tower)")
            return d[key]

        return cls(
            hidden_size=int(need("hidden_size")), input_feat_size=int(need("input_feat_size")),
            num_heads=int(need("conf_num_attention_heads")), num_layers=int(need("conf_num_hidden_layers")),
            chunk_size=int(need("conf_attention_chunk_size")),
            context_left=int(need("conf_attention_context_left")),
            context_right=int(need("conf_attention_context_right")),
            logit_cap=float(need("conf_attention_logit_cap")), conv_kernel_size=int(need("conf_conv_kernel_size")),
            reduction_factor=int(need("conf_reduction_factor")),
            residual_weight=float(need("conf_residual_weight")),
            gradient_clipping=float(need("gradient_clipping")), rms_norm_eps=float(need("rms_norm_eps")),
            sscp_channels=tuple(int(c) for c in need("sscp_conv_channel_size")),
            sscp_kernels=tuple((int(h), int(w)) for h, w in need("sscp_conv_kernel_size")),
            sscp_strides=tuple((int(h), int(w)) for h, w in need("sscp_conv_stride_size")),
            # The released config.json spells it "sscp_conv_eps", which transformers ignores (same value, 1e-3).
            sscp_eps=float(d.get("sscp_conv_group_norm_eps", 1e-3)),
        )


class CumulativeGroupNorm(nn.Module):
    """One-group norm whose mean and variance run cumulatively over time (causal), per-channel scale, float32."""

    def __init__(self, num_channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: Tensor, x_is_temporary: bool = False) -> Tensor:  # (B, T, F, C) -> (B, T, F, C)
        """`x_is_temporary`: x is the caller's own fresh map (the conv's output), so a float32 x may be written over
        where autograd does not need it: the same operations in the same order, without the four full-size
        temporaries (a 30 s clip's first map is ~50 MB, and first touching a fresh one costs more than its
        arithmetic)."""
        h = x.float()
        per_step = h.shape[2] * h.shape[3]
        count = torch.arange(1, h.shape[1] + 1, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * per_step
        mean = torch.cumsum(h.sum(dim=(2, 3), keepdim=True), dim=1) / count
        if x_is_temporary and self.may_write_over(x):
            centred = h.sub_(mean)
            variance = torch.cumsum(centred.pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
            return centred.mul_(torch.rsqrt(variance + self.eps)).mul_(self.weight.float())
        # Each step's squared deviations are taken from its own running mean, then accumulated.
        variance = torch.cumsum((h - mean).pow(2).sum(dim=(2, 3), keepdim=True), dim=1) / count
        return ((h - mean) * torch.rsqrt(variance + self.eps) * self.weight.float()).to(x.dtype)

    @staticmethod
    def may_write_over(x: Tensor) -> bool:
        """Whether forward(x, x_is_temporary=True) writes over x: a float32 x (x.float() is x itself) that
        layers.may_write_over allows."""
        return x.dtype == torch.float32 and may_write_over(x)


class SSCPConvBlock(nn.Module):
    """Zero-pad (frequency 1 | 1, time 0 | kernel - 1) -> Conv2d without bias -> cumulative group norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int], stride: tuple[int, int],
                 eps: float):
        super().__init__()
        self.padding = (1, 1, 0, kernel[0] - 1)  # F.pad order: freq left, freq right, time top, time bottom
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, bias=False)
        self.norm = CumulativeGroupNorm(out_channels, eps)

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, T, F) -> (B, C_out, T', F')
        x = self.conv(F.pad(x, self.padding).to(self.conv.weight.dtype))
        written_over = self.norm.may_write_over(x)  # the conv's fresh output: the norm, then the ReLU, may take it
        y = self.norm(x.permute(0, 2, 3, 1), x_is_temporary=True).permute(0, 3, 1, 2)
        return y.relu_() if written_over else F.relu(y)


class SubsampleConvProjection(nn.Module):
    """(B, T, mel) -> (B, T / 4, hidden): strided conv blocks, then a linear map of the (freq x channel) features."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        freq, in_ch = cfg.input_feat_size, 1
        for i, (out_ch, kernel, stride) in enumerate(zip(cfg.sscp_channels, cfg.sscp_kernels, cfg.sscp_strides)):
            setattr(self, f"conv_{i}", SSCPConvBlock(in_ch, out_ch, kernel, stride, cfg.sscp_eps))
            freq, in_ch = (freq + 2 - kernel[1]) // stride[1] + 1, out_ch
        self.num_convs = len(cfg.sscp_channels)
        self.input_proj_linear = nn.Linear(freq * in_ch, cfg.hidden_size, bias=False)

    def forward(self, features: Tensor) -> Tensor:
        x = features.unsqueeze(1)  # (B, 1, T, mel): time is the height, frequency the width
        for i in range(self.num_convs):
            x = getattr(self, f"conv_{i}")(x)
        b, c, t, f = x.shape
        # features ordered f * C + c
        return linear_forward(self.input_proj_linear, x.permute(0, 2, 3, 1).reshape(b, t, f * c))


class ConformerFeedForward(nn.Module):
    """Half-step FFW: x + w * post_norm(clip(W2 silu(W1 pre_norm(clip(x)))))."""

    def __init__(self, hidden: int, residual_weight: float, clip: float):
        super().__init__()
        self.clip, self.residual_weight = clip, residual_weight
        self.pre_layer_norm = RMSNorm(hidden, _DEFAULT_NORM_EPS)
        self.ffw_layer_1 = nn.Linear(hidden, 4 * hidden, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * hidden, hidden, bias=False)
        self.post_layer_norm = RMSNorm(hidden, _DEFAULT_NORM_EPS)

    def forward(self, x: Tensor) -> Tensor:
        y = linear_forward(self.ffw_layer_1, self.pre_layer_norm(x.clamp(-self.clip, self.clip)))
        y = linear_forward(self.ffw_layer_2, F.silu(y))
        return x + self.post_layer_norm(y.clamp(-self.clip, self.clip)) * self.residual_weight


class ConformerAttention(nn.Module):
    """x + post_norm(clip(post(attn(pre_attn_norm(clip(x))))))."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.pre_attn_norm = RMSNorm(cfg.hidden_size, _DEFAULT_NORM_EPS)
        self.attn = LocalRelativeAttention(cfg.hidden_size, cfg.num_heads, cfg.chunk_size, cfg.context_left,
                                           cfg.context_right, cfg.logit_cap)
        self.post = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.post_norm = RMSNorm(cfg.hidden_size, _DEFAULT_NORM_EPS)

    def forward(self, x: Tensor, padding_mask: Tensor) -> Tensor:
        y = linear_forward(self.post, self.attn(self.pre_attn_norm(x.clamp(-self.clip, self.clip)), padding_mask))
        return x + self.post_norm(y.clamp(-self.clip, self.clip))


class LightConv1d(nn.Module):
    """x + linear_end(silu(conv_norm(clip(causal depthwise conv(GLU(linear_start(pre_norm(x))))))))."""

    def __init__(self, hidden: int, kernel_size: int, eps: float, clip: float):
        super().__init__()
        self.clip, self.causal_padding = clip, kernel_size - 1
        self.pre_layer_norm = RMSNorm(hidden, eps)
        self.linear_start = nn.Linear(hidden, 2 * hidden, bias=False)
        self.depthwise_conv1d = nn.Conv1d(hidden, hidden, kernel_size, groups=hidden, bias=False)
        self.conv_norm = RMSNorm(hidden, eps)
        self.linear_end = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, C)
        y = F.glu(linear_forward(self.linear_start, self.pre_layer_norm(x)), dim=-1)  # first half * sigmoid(second)
        y = self.depthwise_conv1d(F.pad(y.transpose(1, 2), (self.causal_padding, 0))).transpose(1, 2)
        return x + linear_forward(self.linear_end, F.silu(self.conv_norm(y.clamp(-self.clip, self.clip))))


class ConformerBlock(nn.Module):
    """FFW/2 -> attention -> zero padded frames -> light conv -> FFW/2 -> norm."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.ffw_layer_start = ConformerFeedForward(cfg.hidden_size, cfg.residual_weight, self.clip)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = LightConv1d(cfg.hidden_size, cfg.conv_kernel_size, cfg.rms_norm_eps, self.clip)
        self.ffw_layer_end = ConformerFeedForward(cfg.hidden_size, cfg.residual_weight, self.clip)
        self.norm = RMSNorm(cfg.hidden_size, _DEFAULT_NORM_EPS)

    def forward(self, x: Tensor, padding_mask: Tensor, keep_every: int = 1) -> Tensor:  # (B, T, C), (B, T) True = pad
        """`keep_every`: only every n-th frame of the output is wanted (the tower's last block, whose output is
        taken every reduction_factor frames): the end FFW and norm work frame by frame, so they run on those
        frames alone, a quarter of their products for the released configs."""
        x = self.attention(self.ffw_layer_start(x), padding_mask)
        x = self.lconv1d(x * (~padding_mask).unsqueeze(-1).to(x.dtype))
        if keep_every > 1:
            x = x[:, ::keep_every]
        return self.norm(self.ffw_layer_end(x).clamp(-self.clip, self.clip))


class AudioEncoder(nn.Module):
    """log-mel frames + padding mask -> (encodings (B, T', hidden), padding mask (B, T'), True = padding)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.config = cfg
        self.subsample_conv_projection = SubsampleConvProjection(cfg)
        self.conformer = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.num_layers))

    def forward(self, input_features: Tensor, padding_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.subsample_conv_projection(input_features)
        time_stride = 1
        for stride in self.config.sscp_strides:
            time_stride *= stride[0]
        # Each subsampled frame takes the mask of the first input frame of its receptive field.
        starts = (torch.arange(x.shape[1], device=x.device) * time_stride).clamp(max=padding_mask.shape[1] - 1)
        mask = padding_mask[:, starts]
        every = self.config.reduction_factor
        for i, block in enumerate(self.conformer):
            x = block(x, mask, keep_every=every if i == len(self.conformer) - 1 else 1)
        if not len(self.conformer):
            x = x[:, ::every]
        mask = mask[:, ::every]
        return x.masked_fill(mask.unsqueeze(-1), 0.0), mask


def build_audio_tower(audio_config: Mapping[str, Any]) -> AudioEncoder:
    """The audio tower from config.json's raw "audio_config" dict; no buffers, so it builds on the meta device."""
    return AudioEncoder(AudioConfig.from_dict(audio_config))
