"""LoRA beside any of the decoder's linear kinds: float (nn.Linear), our int8 / int4 (gemma3n.quant) and GGUF blocks.

y = base(x) + B(A(dropout(x))) * scaling, with A [r, in] and B [out, r] trained in float32 and the base frozen in
its stored form. The quantised kinds compute without autograd (native kernels, packed formats), so their products
run through `frozen_linear`: the forward is theirs, the backward multiplies the incoming gradient by the dequantised
weight a block of output rows at a time, so no float copy of a whole weight is ever made (QLoRA).

A 16-bit float base on the CPU takes the same road while training: PyTorch's bfloat16 / float16 GEMM is hundreds of
times slower than float32 on CPUs without 16-bit units (AVX2), so its products (forward and backward) are computed
in float32 a block of rows at a time and rounded once (`quant.modules.blockwise_matmul`).
"""
from __future__ import annotations

import functools
import math
import re

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..quant.gguf_modules import GGUFEmbedding, GGUFLinear
from ..quant.modules import Int4Linear, Int8Linear, blockwise_matmul

QUANTISED_LINEARS = (Int8Linear, Int4Linear, GGUFLinear)
_BACKWARD_BLOCK_ROWS = 2048  # output rows of a quantised weight dequantised at once in the backward (a tile multiple)
_SIXTEEN_BIT = (torch.bfloat16, torch.float16)


def is_linear(module: nn.Module) -> bool:
    """A bias-free linear of one of the kinds LoRA can sit beside (embedding tables excluded)."""
    if isinstance(module, (GGUFEmbedding,)) or type(module).__name__.endswith("Embedding"):
        return False
    if type(module) is nn.Linear:
        return module.bias is None
    return isinstance(module, QUANTISED_LINEARS)


class _FrozenProduct(torch.autograd.Function):
    """x -> product(x) where product is a frozen quantised x W^T; the gradient reaches x only."""

    @staticmethod
    def forward(ctx, x: Tensor, product, dequantize, out_features: int) -> Tensor:
        ctx.dequantize, ctx.out_features, ctx.x_dtype = dequantize, out_features, x.dtype
        with torch.no_grad():
            return product(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        flat = grad.reshape(-1, ctx.out_features).float()
        grad_x = None
        for start in range(0, ctx.out_features, _BACKWARD_BLOCK_ROWS):
            rows = slice(start, min(start + _BACKWARD_BLOCK_ROWS, ctx.out_features))
            w = ctx.dequantize(rows)
            part = flat[:, rows] @ (w if w.dtype == torch.float32 else w.float())
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x.reshape(*grad.shape[:-1], -1).to(ctx.x_dtype), None, None, None


def frozen_linear(module: nn.Module, x: Tensor) -> Tensor:
    """module(x) for a frozen linear of any kind, differentiable with respect to x when autograd is on. A tied
    embedding table used as the LM head (its `.linear`) counts as a linear too."""
    if type(module) is nn.Linear or isinstance(module, nn.Embedding):
        weight, bias = module.weight, getattr(module, "bias", None)
        if not (torch.is_grad_enabled() and bias is None and widened_on_cpu(weight)):
            return F.linear(x, weight, bias)
        product, dequantize, out_features = functools.partial(_wide_linear, weight=weight), weight.__getitem__, \
            weight.shape[0]
    else:
        product = module.linear if hasattr(module, "linear") else module.forward
        # float32 rows where the module unpacks them so (no round trip through its scale dtype)
        dequantize, out_features = getattr(module, "dequantize_float", module.dequantize), module.out_features
    if not (torch.is_grad_enabled() and x.requires_grad):
        return product(x)
    return _FrozenProduct.apply(x, product, dequantize, out_features)


def widened_on_cpu(weight: Tensor) -> bool:
    """A frozen 16-bit float weight on the CPU, whose products training computes in float32 (module docstring)."""
    return weight.device.type == "cpu" and weight.dtype in _SIXTEEN_BIT and not weight.requires_grad


def _wide_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x W^T for a 16-bit W on the CPU: float32 products of a block of rows at a time, rounded once to x's dtype."""
    flat = x.reshape(-1, weight.shape[1]).to(weight.dtype)
    return blockwise_matmul(flat, weight.__getitem__, weight.shape[0]).reshape(*x.shape[:-1], weight.shape[0])


class FrozenLinear(nn.Module):
    """A quantised linear that LoRA does not target, made differentiable with respect to its input (training only:
    gradients must flow through it to the adapters of earlier layers)."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self.base_layer, x)


class LoRALinear(nn.Module):
    """base(x) + lora_B(lora_A(dropout(x))) * scaling; the names are PEFT's (base_layer, lora_A, lora_B)."""

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """PEFT's default initialisation: A as nn.Linear's Kaiming-uniform, B zero (so training starts at the
        base model)."""
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
        with torch.no_grad():
            self.lora_A.weight.uniform_(-bound, bound, generator=generator)
            self.lora_B.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        out = frozen_linear(self.base_layer, x)
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        if torch.is_grad_enabled():  # training: float32, through autograd
            delta = self.lora_B(self.lora_A(x)) * self.scaling
        else:
            delta = lora_delta(x, self.lora_A.weight, self.lora_B.weight, self.scaling)
        return out + delta.to(out.dtype)

    def delta_weight(self) -> Tensor:
        """scaling * B A, float32 [out, in]: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def lora_delta(x: Tensor, a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """scaling * B A x at inference, float32, computed in float64 and rounded once. In float32 a matrix product
    rounds by how many rows it multiplies, so a row's delta would change with the rows beside it in a batch; in
    float64 those differences stay far below float32's rounding, and each row gets the same bits alone or in any
    batch (a served adapter row answers as `gemma3n run --adapter` does)."""
    wide = torch.float64
    return (F.linear(F.linear(x.to(wide), a.to(wide)), b.to(wide)) * scaling).to(torch.float32)


def _device_of(module: nn.Module) -> torch.device:
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def decoder_linears(lm: nn.Module) -> dict[str, nn.Module]:
    """Module path (in the causal LM, "model.layers.3.self_attn.q_proj") -> linear, for every linear of the
    text decoder that LoRA may target (the embedding table / LM head excluded)."""
    return {path: m for path, m in lm.named_modules() if path.startswith("model.") and is_linear(m)}


def select_targets(lm: nn.Module, target: str, external_name) -> list[str]:
    """Paths of the decoder linears chosen by `target`: "all-linear", or a regular expression that must match a
    module's whole name as PEFT matches it (the name in the base checkpoint's transformers class, given by
    `external_name(path)`, e.g. "model.language_model.layers.0.self_attn.q_proj")."""
    linears = decoder_linears(lm)
    if target == "all-linear":
        return list(linears)
    try:
        pattern = re.compile(target)
    except re.error as e:
        raise ValueError(f"--target {target!r} is not a valid regular expression ({e})") from None
    chosen = [p for p in linears if pattern.fullmatch(external_name(p)) or pattern.fullmatch(p)]
    if not chosen:
        example = external_name(next(iter(linears)))
        raise ValueError(f"--target {target!r} matches no linear layer of the text decoder; it must match whole "
                         f"module names such as {example!r} (e.g. '.*self_attn\\.(q_proj|v_proj)'), or be all-linear")
    return chosen


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def inject(lm: nn.Module, paths: list[str], rank: int, alpha: float, dropout: float = 0.0,
           use_rslora: bool = False) -> dict[str, LoRALinear]:
    """Wrap each linear at `paths` in a LoRALinear (in place); returns path -> wrapper."""
    wrapped = {}
    for path in paths:
        base = lm.get_submodule(path)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{path} already carries an adapter")
        wrapped[path] = LoRALinear(base, rank, alpha, dropout, use_rslora)
        replace_module(lm, path, wrapped[path])
    return wrapped


def make_differentiable(lm: nn.Module) -> list[str]:
    """Wrap the linears that carry no adapter and need `frozen_linear` in FrozenLinear: the quantised ones, so
    gradients flow through them, and 16-bit float ones on the CPU, so they compute in float32; returns their paths
    (for `undo_differentiable`)."""
    def needs_wrapping(m: nn.Module) -> bool:
        if type(m) is nn.Linear:
            return m.bias is None and widened_on_cpu(m.weight)
        return isinstance(m, QUANTISED_LINEARS) and not isinstance(m, GGUFEmbedding)
    paths = [p for p, m in lm.named_modules() if needs_wrapping(m) and not p.endswith(".base_layer")
             and p != "model.embed_tokens"]
    for path in paths:
        replace_module(lm, path, FrozenLinear(lm.get_submodule(path)))
    return paths


def undo_differentiable(lm: nn.Module, paths: list[str]) -> None:
    for path in paths:
        replace_module(lm, path, lm.get_submodule(path).base_layer)


def merge_into(lm: nn.Module, path: str, wrapper: LoRALinear) -> bool:
    """Fold the adapter into a float base weight (a new tensor: the stored one may be a read-only memory map);
    returns False (leaving the wrapper in place) when the base is quantised, where it stays beside the weights."""
    base = wrapper.base_layer
    if type(base) is not nn.Linear:
        return False
    with torch.no_grad():
        merged = (base.weight.float() + wrapper.delta_weight().to(base.weight.device)).to(base.weight.dtype)
    base.weight = nn.Parameter(merged, requires_grad=False)
    replace_module(lm, path, base)
    return True
