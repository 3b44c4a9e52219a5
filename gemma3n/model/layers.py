"""Small numeric building blocks shared by the Gemma decoders and towers: norms, RoPE, soft-capping, Gaussian top-k,
the towers' linear products."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import kernels


class RMSNorm(nn.Module):
    """x / rms(x) * scale, computed in float32 and cast back (Gemma 3n: scale = weight; Gemma 3: 1 + weight)."""

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True, offset: float = 0.0):
        super().__init__()
        self.eps, self.with_scale, self.offset = eps, with_scale, offset
        if with_scale:
            # Gemma 3n stores the scale itself (init 1); Gemma 3 stores scale - 1 (init 0).
            self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))

    def forward(self, x: Tensor) -> Tensor:
        h = _normalise(x, self.eps)
        if self.with_scale:
            w = _as_f32(self.weight)
            # w + 0.0 is w itself (Gemma 3n), so that add is skipped; Gemma 3 adds its offset as a float32 constant
            h = h * (w + const(self.offset, torch.float32) if self.offset else w)
        return h if h.dtype == x.dtype else h.to(x.dtype)


def linear_forward(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) for an encoder tower's linear layer: a plain float32 nn.Linear over many rows goes through the
    library's float32 GEMM where that applies (kernels.f32_gemm_applies: each output summed in one order, whatever
    the batch, the threads or the vector width; the reference's GEMM differs only in the order of the additions).
    Any other module (quantised, adapted, bf16) is called as it is. Module hooks do not run on the library's path."""
    if type(module) is nn.Linear and kernels.f32_gemm_applies(module.weight, x):
        y = kernels.f32_gemm(module.weight, x)
        if y is not None:
            y = y.view(*x.shape[:-1], y.shape[-1])
            return y if module.bias is None else y.add_(module.bias)
    return module(x)


def rms_norm_no_scale(x: Tensor, eps: float) -> Tensor:
    """The weightless RMSNorm (Gemma 3n v_norm), float32 inside."""
    h = _normalise(x, eps)
    return h if h.dtype == x.dtype else h.to(x.dtype)


def _as_f32(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def _normalise(x: Tensor, eps: float) -> Tensor:
    """x / sqrt(mean(x^2) + eps) in float32, in as few ops as give the same bits as the plain expression
    `h * torch.pow(h.pow(2).mean(-1, keepdim=True) + eps, -0.5)`: x * x is pow(x, 2); mean is sum then an
    in-place division by the count (so says ATen on the CPU), here by a float32 0-dim count; adding eps as a float32
    0-dim tensor in place is what adding the Python float does (it is converted to float32 first). Each saves a
    scalar conversion or a new tensor. pow(-0.5) rather than rsqrt, as the reference does (parity with JAX)."""
    h = _as_f32(x)
    f32 = torch.float32
    mean_square = torch.sum(h * h, -1, keepdim=True).div_(const(float(h.shape[-1]), f32)).add_(const(eps, f32))
    return h * torch.pow(mean_square, -0.5)


_CONSTS: dict[tuple[float, torch.dtype], Tensor] = {}


def const(value: float, dtype: torch.dtype) -> Tensor:
    """`torch.tensor(value, dtype=dtype)` on the CPU, made once: a 0-dim operand costs a dispatch, not a tensor
    creation per call. (Read-only: never write into it.)"""
    key = (value, dtype)
    t = _CONSTS.get(key)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor, usable with autograd too, wherever it is first made
            t = _CONSTS[key] = torch.tensor(value, dtype=dtype, device="cpu")
    return t


def scalar_operand(value: float, dtype: torch.dtype) -> Tensor | float:
    """The operand to combine a `dtype` tensor with the Python float `value`, as the plain expression does: in
    float32 / float64 the float is first rounded to the dtype, so a cached 0-dim tensor gives the same bits without
    the per-call conversion; reduced precisions compute with the float itself, so it stays a Python float."""
    return const(value, dtype) if dtype in (torch.float32, torch.float64) else value


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean attention mask (True = may attend) -> 0 / -inf in `dtype`: exactly what
    `scaled_dot_product_attention` turns a boolean mask into on every call, done once per forward call instead of
    once per layer."""
    return torch.where(allowed, const(0.0, dtype), const(float("-inf"), dtype))


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU with the tanh approximation (`gelu_pytorch_tanh`)."""
    return F.gelu(x, approximate="tanh")


def may_write_over(x: Tensor) -> bool:
    """Whether x, a fresh tensor its caller owns, may be written over: autograd does not need it, and no graph is
    being traced (torch.compile / torch.export record the plain operations)."""
    return (not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting())


def softcap(x: Tensor, cap: float | None, x_is_temporary: bool = False) -> Tensor:
    """cap * tanh(x / cap); identity when cap is None.

    x_is_temporary: x is the caller's own fresh tensor (logits just computed), so the result may overwrite it where
    autograd does not need it. The same operations, so the same bits, without two fresh full-size tensors: for a
    262k vocabulary each costs more in first-touch page faults than its arithmetic."""
    if cap is None:
        return x
    if x_is_temporary and may_write_over(x):
        return x.div_(cap).tanh_().mul_(cap)
    return torch.tanh(x / cap) * cap


def normal_quantile(p: float) -> float:
    """Phi^-1(p) computed in float32 exactly as torch.distributions.Normal.icdf does (the reference's path)."""
    p32 = torch.tensor(p, dtype=torch.float32, device="cpu")
    return float(torch.erfinv(2 * p32 - 1) * math.sqrt(2))


def gaussian_topk(gate: Tensor, z: float) -> Tensor:
    """Keep only activations above mean + z * std (population std) of each row, shifted down: ReLU(x - cutoff).

    z is the float32 quantile rounded to the activation dtype (1.6484375 in bf16), as in the reference. The
    library's row kernel does it in one pass where it applies (the statistics summed in double, each rounded once:
    PyTorch's mean and std to float32 rounding; torch.std alone was a tenth of a prompt's matrix products' time)."""
    if kernels.row_kernels_apply(gate):
        out = kernels.gaussian_topk(gate, float(const(z, gate.dtype)))
        if out is not None:
            return out
    mean = gate.mean(-1, keepdim=True)
    std = gate.std(-1, keepdim=True, unbiased=False)
    return F.relu(gate - (mean + std * const(z, gate.dtype)))


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


    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions (B, T) -> the (cos, signed sin) pair (B, 1, T, head_dim) that `rotate` takes: made once per
        forward call and shared by every layer of this RoPE type."""
        return rope_tables(*self(positions, dtype))


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by cos/sin (B, T, D): dimension i pairs with i + D/2."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rope_tables(cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin (B, T, D) -> cos (B, 1, T, D) and sin with its first half negated, for `rotate`."""
    half = sin.shape[-1] // 2
    return cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]


def rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """`apply_rope` in 4 ops instead of 10, with the same bits: cat(-x2, x1) * sin = roll(x) * cat(-s1, s2), since
    (-a) * b == a * (-b) exactly. x (B, H, T, D); cos, signed_sin (B, 1, T, D) from `rope_tables`."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin
