"""Small numeric building blocks shared by the Gemma decoders: norms, RoPE, soft-capping, Gaussian top-k."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back (Gemma 3n: scale = weight; Gemma 3: 1 + weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps, self.with_scale, self.offset = eps, with_scale, offset
        if with_scale:
            # Gemma 3n stores the scale itself (init 1); Gemma 3 stores scale - 1 (init 0).
            self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        # pow(-0.5) rather than rsqrt, as the reference does (it keeps parity with the JAX original to the ulp).
        h = h * torch.pow(h.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.with_scale:
            h = h * (self.weight.float() + self.offset)
        return h.type_as(x)


def rms_norm_no_scale(x: Tensor, eps: float) -> Tensor:
    """The weightless RMSNorm (Gemma 3n v_norm), float32 inside."""
    h = x.float()
    return (h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (`gelu_pytorch_tanh`)."""
    return F.gelu(x, approximate="tanh")


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """cap * tanh(x / cap); identity when cap is None."""
    if cap is None:
        return x
    return torch.tanh(x / cap) * cap


def normal_quantile(p: float) -> float:
    """Phi^-1(p) computed in float32 exactly as torch.distributions.Normal.icdf does (the reference's path)."""
    p32 = torch.tensor(p, dtype=torch.float32, device="cpu")
    return float(torch.erfinv(2 * p32 - 1) * math.sqrt(2))


def gaussian_topk(gate: Tensor, z: float) -> Tensor:
    """Keep only activations above mean + z * std (population std) of each row, shifted down: ReLU(x - cutoff).

    z is the float32 quantile rounded to the activation dtype (1.6484375 in bf16), as in the reference."""
    mean = gate.mean(-1, keepdim=True)
    std = gate.std(-1, keepdim=True, unbiased=False)
    return F.relu(gate - (mean + std * torch.tensor(z, dtype=gate.dtype, device=gate.device)))


class RotaryEmbedding(nn.Module):
    """Standard half-rotation RoPE tables for one theta; positions may be scaled linearly (Gemma 3 global layers)."""

    def __init__(self, head_dim: int, theta: float, scaling_factor: float = 1.0):
        super().__init__()
        # Explicit CPU: the model is built on the meta device, and this non-persistent table is not in any file.
        exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
        inv_freq = 1.0 / (theta ** exponent)
        # Linear RoPE scaling divides the frequencies, which is the same as dividing the positions.
        self.register_buffer("inv_freq", inv_freq / scaling_factor, persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> cos, sin (B, T, head_dim), computed in float32 then cast to `dtype`."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by cos/sin (B, T, D): dimension i pairs with i + D/2."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
