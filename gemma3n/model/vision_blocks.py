"""MobileNet-V5 building blocks: channel RMS norm, TF-"SAME" convs, edge residual, universal inverted residual,
mobile multi-query attention, layer scale and the multi-scale fusion adapter.

Attribute names follow timm's modules (`conv_exp`, `bn1`, `pw_exp.conv`, `attn.key.down_conv`, ...) so the
checkpoint's `model.vision_tower.timm_model.*` tensors load by a prefix strip."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import kernels
from .layers import gelu_tanh, may_write_over


def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """Round a channel count to a multiple of `divisor`, never more than 10% below `value` (timm's rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


class RMSNorm2d(nn.Module):
    """Per-pixel RMS norm over the channel axis of (N, C, H, W), then optional GELU-tanh; what a block does next
    (a layer scale `gamma`, a `residual`) may be passed in, so that a float32 channels-last map takes one fused
    native pass (kernels.channel_rms_norm) instead of one per operation.

    Computed in the input dtype without a float32 upcast: timm's RmsNorm2d does the same (fast-norm off)."""

    def __init__(self, channels: int, eps: float = 1e-6, act: bool = False):
        super().__init__()
        self.eps, self.act = eps, act
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor, gamma: Tensor | None = None, residual: Tensor | None = None,
                x_is_temporary: bool = False) -> Tensor:
        """`x_is_temporary`: the caller holds no other reference to x (a conv's fresh output), so the fused pass may
        write over it: a map of tens of MB not allocated again, whose first touch of each page costs more than the
        norm's arithmetic on a 768 px image."""
        if kernels.map_kernels_apply(x, residual, self.weight, gamma):
            return kernels.channel_rms_norm(x, self.weight, self.eps, self.act, gamma, residual,
                                            out=x if x_is_temporary else None)
        x = x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + self.eps) * self.weight.view(1, -1, 1, 1)
        if self.act:
            x = gelu_tanh(x)
        if gamma is not None:
            x = x * gamma.view(1, -1, 1, 1)
        return x if residual is None else x + residual


class LayerScale2d(nn.Module):
    """Per-channel scale `gamma` on an (N, C, H, W) branch output."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 1e-5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view(1, -1, 1, 1)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size: for a stride-2 conv on an even input
    the extra pixel goes right/bottom (asymmetric), which PyTorch's symmetric padding cannot express."""

    def same_pads(self, x: Tensor) -> list[int]:
        """[left, right, top, bottom] for this input, F.pad's order."""
        pads = []
        for size, k, s, d in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1], self.dilation[::-1]):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        return pads

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.pad(x, self.same_pads(x)))


def conv2d(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, bias: bool = False,
           same_padding: bool = True) -> nn.Conv2d:
    """A conv padded as timm pads it: "SAME" (static when symmetric, else dynamic) or PyTorch-style symmetric."""
    if same_padding and not (stride == 1 and (kernel - 1) % 2 == 0):
        return SameConv2d(in_ch, out_ch, kernel, stride, padding=0, groups=groups, bias=bias)
    padding = (kernel - 1) // 2 if same_padding else ((stride - 1) + (kernel - 1)) // 2
    return nn.Conv2d(in_ch, out_ch, kernel, stride, padding=padding, groups=groups, bias=bias)


def apply_conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x); for a channels-last float32 map, two kinds go through the library:
    - a plain 1x1 conv is the product of the pixels [N*H*W, C_in] with the weight [C_out, C_in]: the float32 GEMM
      where that applies (kernels.f32_gemm_applies), its rows of output already the channels-last map;
    - a depthwise conv reads the map where it lies, its padding (symmetric, or "SAME"'s extra right / bottom pixel)
      implicit (kernels.depthwise_conv), where PyTorch's conv needs a padded copy for "SAME"."""
    if (isinstance(conv, nn.Conv2d) and conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and x.dim() == 4 and kernels.VECTORISED and kernels.map_kernels_apply(x, None, conv.weight, conv.bias)):
        return _depthwise(conv, x)
    if (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and conv.padding == (0, 0) and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        n, c, h, w = x.shape
        weight, pixels = conv.weight.reshape(conv.out_channels, c), x.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if kernels.f32_gemm_applies(weight, pixels):
            y = kernels.f32_gemm(weight, pixels)
            if y is not None:
                if conv.bias is not None:
                    y.add_(conv.bias)
                return y.view(n, h, w, conv.out_channels).permute(0, 3, 1, 2)
    return conv(x)


def _depthwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    h, w = x.shape[-2:]
    if isinstance(conv, SameConv2d):
        left, right, top, bottom = conv.same_pads(x)
    else:
        (top, left), (bottom, right) = conv.padding, conv.padding
    (kh, kw), (sh, sw) = conv.kernel_size, conv.stride
    out_size = ((h + top + bottom - kh) // sh + 1, (w + left + right - kw) // sw + 1)
    if min(out_size) <= 0:
        return conv(x)  # a map smaller than the kernel: PyTorch's conv says so
    return kernels.depthwise_conv(x, conv.weight, conv.bias, (sh, sw), top, left, out_size)


class ConvNorm(nn.Module):
    """conv -> RMSNorm2d (-> GELU-tanh when act) (-> times gamma) (-> plus residual)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True,
                 bias: bool = False, same_padding: bool = True):
        super().__init__()
        self.conv = conv2d(in_ch, out_ch, kernel, stride, groups, bias, same_padding)
        self.bn = RMSNorm2d(out_ch, act=act)

    def forward(self, x: Tensor, gamma: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
        return self.bn(apply_conv(self.conv, x), gamma, residual, x_is_temporary=True)


class EdgeResidual(nn.Module):
    """Fused MBConv: full k x k expansion conv (carries the stride) -> norm+GELU -> 1x1 projection -> norm."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int, exp_ratio: float,
                 same_padding: bool = True):
        super().__init__()
        mid = make_divisible(in_ch * exp_ratio)
        self.has_skip = in_ch == out_ch and stride == 1
        self.conv_exp = conv2d(in_ch, mid, kernel, stride, same_padding=same_padding)
        self.bn1 = RMSNorm2d(mid, act=True)
        self.conv_pwl = conv2d(mid, out_ch, 1, same_padding=same_padding)
        self.bn2 = RMSNorm2d(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv_exp(x), x_is_temporary=True)
        return self.bn2(apply_conv(self.conv_pwl, y), residual=x if self.has_skip else None, x_is_temporary=True)


class UniversalInvertedResidual(nn.Module):
    """UIB: [depthwise start conv + norm] -> 1x1 expand + norm+GELU -> [depthwise mid conv + norm+GELU]
    -> 1x1 project + norm -> [layer scale] (+ x). A kernel of 0 leaves that depthwise conv out."""

    def __init__(self, in_ch: int, out_ch: int, dw_start: int, dw_mid: int, stride: int, exp_ratio: float,
                 layer_scale: bool = True, skip: bool = True, same_padding: bool = True):
        super().__init__()
        if stride > 1 and not (dw_start or dw_mid):
            raise ValueError("a strided universal inverted residual block needs a depthwise conv")
        mid = make_divisible(in_ch * exp_ratio)
        self.has_skip = skip and in_ch == out_ch and stride == 1
        # The stride goes on the mid conv when there is one, else on the start conv.
        self.dw_start = (ConvNorm(in_ch, in_ch, dw_start, 1 if dw_mid else stride, groups=in_ch, act=False,
                                  same_padding=same_padding) if dw_start else None)
        self.pw_exp = ConvNorm(in_ch, mid, 1, same_padding=same_padding)
        self.dw_mid = (ConvNorm(mid, mid, dw_mid, stride, groups=mid, same_padding=same_padding)
                       if dw_mid else None)
        self.pw_proj = ConvNorm(mid, out_ch, 1, act=False, same_padding=same_padding)
        self.layer_scale = LayerScale2d(out_ch) if layer_scale else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.dw_start(x) if self.dw_start is not None else x
        y = self.pw_exp(y)
        if self.dw_mid is not None:
            y = self.dw_mid(y)
        gamma = self.layer_scale.gamma if self.layer_scale is not None else None
        return self.pw_proj(y, gamma, x if self.has_skip else None)


class Pointwise(nn.Module):
    """A bias-free 1x1 projection held as `.proj` (timm's query / output containers)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return apply_conv(self.proj, x)


class KeyValueProjection(nn.Module):
    """[depthwise strided conv + norm, when kv_stride > 1] -> 1x1 projection to one shared head."""

    def __init__(self, dim: int, head_dim: int, kernel: int, kv_stride: int, same_padding: bool):
        super().__init__()
        self.down_conv = (conv2d(dim, dim, kernel, kv_stride, groups=dim, same_padding=same_padding)
                          if kv_stride > 1 else None)
        self.norm = RMSNorm2d(dim) if kv_stride > 1 else None
        self.proj = nn.Conv2d(dim, head_dim, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.down_conv is not None:
            x = self.norm(apply_conv(self.down_conv, x), x_is_temporary=True)
        return apply_conv(self.proj, x)


class MultiQueryAttention2d(nn.Module):
    """Multi-query attention over the pixels: `heads` query heads, one shared key/value head."""

    def __init__(self, dim: int, out_ch: int, heads: int, head_dim: int, kernel: int, kv_stride: int,
                 same_padding: bool):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.query = Pointwise(dim, heads * head_dim)
        self.key = KeyValueProjection(dim, head_dim, kernel, kv_stride, same_padding)
        self.value = KeyValueProjection(dim, head_dim, kernel, kv_stride, same_padding)
        self.output = Pointwise(heads * head_dim, out_ch)

    def forward(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        # Query channels are head-major (channel = head * head_dim + j); tokens are pixels in row-major order.
        # The .contiguous() calls lay q, k, v out as the reference does, so the same attention kernel runs; the
        # output leaves channels-last, the layout the output projection takes as a GEMM of its pixels.
        q = self.query(x)  # channels-last as the conv or the GEMM leaves it: pixels by (head, j), one copy below
        q = q.permute(0, 2, 3, 1).reshape(n, h * w, self.heads, self.head_dim).transpose(1, 2).contiguous()
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (N, 1, HW', D), broadcast over heads
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()
        o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        o = o.transpose(1, 2).reshape(n, h, w, self.heads * self.head_dim).permute(0, 3, 1, 2)
        return self.output(o)


class MobileAttention(nn.Module):
    """norm -> multi-query attention -> layer scale (+ x)."""

    def __init__(self, in_ch: int, out_ch: int, heads: int, head_dim: int, kernel: int, kv_stride: int,
                 layer_scale: bool = True, same_padding: bool = True):
        super().__init__()
        self.has_skip = in_ch == out_ch
        self.norm = RMSNorm2d(in_ch)
        self.attn = MultiQueryAttention2d(in_ch, out_ch, heads, head_dim, kernel, kv_stride, same_padding)
        self.layer_scale = LayerScale2d(out_ch) if layer_scale else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.attn(self.norm(x))
        if self.layer_scale is not None and self.has_skip:  # x + y * gamma in one pass, over y (a fresh map)
            return torch.addcmul(x, y, self.layer_scale.gamma.view(1, -1, 1, 1), out=y if y.shape == x.shape and
                                 y.stride() == x.stride() and may_write_over(y) else None)
        if self.layer_scale is not None:
            y = self.layer_scale(y)
        return y + x if self.has_skip else y


class MultiScaleFusionAdapter(nn.Module):
    """Fuse feature maps of several resolutions into (N, out_ch, R, R): nearest-upsample all to the largest,
    concatenate on channels, a 1x1 expand/project FFN (no skip, no layer scale), shrink to R, final norm."""

    def __init__(self, in_ch: int, out_ch: int, output_resolution: int, exp_ratio: float = 2.0):
        super().__init__()
        self.output_resolution = output_resolution
        self.ffn = UniversalInvertedResidual(in_ch, out_ch, 0, 0, 1, exp_ratio, layer_scale=False, skip=False)
        self.norm = RMSNorm2d(out_ch)

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]  # the first input is the highest resolution
        resized = [f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="nearest") for f in features]
        x = self.ffn(torch.cat(resized, dim=1))
        r = self.output_resolution
        if size != (r, r):
            if size[0] % r or size[1] % r:
                x = F.interpolate(x, size=(r, r), mode="bilinear")
            else:  # an exact multiple: plain average pooling, as the reference does
                x = F.avg_pool2d(x, kernel_size=(size[0] // r, size[1] // r))
        return self.norm(x, x_is_temporary=True)
