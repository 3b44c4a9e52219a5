"""Quantised replacements for nn.Linear and the tied embedding / LM head.

Decode (a few rows of input) runs PyTorch's own weight-only kernels (`aten._weight_int8pack_mm`,
`aten._weight_int4pack_mm_for_cpu`), which read the packed weights directly. For more rows (prefill) those kernels
are about 10x slower than a bf16 matrix product (measured on this machine: 128 rows x [8192, 2048], 3.7 ms bf16,
40 ms int8, 29 ms int4), so the weight is dequantised a block of output rows at a time and multiplied densely;
the temporary is one block, never the whole matrix.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize, INT4_TILE

KERNEL_MAX_ROWS = 8  # up to this many input rows the integer kernels win; above, blockwise dequantisation
_BLOCK_ROWS = 2048  # output rows dequantised at once on the dense path
_HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int8Linear(nn.Module):
    """y = x W^T with W stored as int8 [N, K] and one scale per output row."""

    def __init__(self, in_features: int, out_features: int, scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=scale_dtype))

    @classmethod
    def from_weight(cls, weight: Tensor) -> "Int8Linear":
        out = cls(weight.shape[1], weight.shape[0], weight.dtype)
        out.qweight, out.scales = int8_quantize(weight, weight.dtype)
        return out

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        return int8_dequantize(self.qweight[rows], self.scales[rows], self.scales.dtype)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] <= KERNEL_MAX_ROWS and _HAS_INT8 and x.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat.to(self.scales.dtype), self.qweight, self.scales)
        else:
            out = _blockwise(flat.to(self.scales.dtype), self.dequantize, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per output channel"


class Int4Linear(nn.Module):
    """y = x W^T with W stored as int4 groups of `group_size` inputs (formats.py describes the layout)."""

    def __init__(self, in_features: int, out_features: int, group_size: int,
                 scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales_and_zeros",
                             torch.empty(in_features // group_size, out_features, 2, dtype=scale_dtype))

    @classmethod
    def from_weight(cls, weight: Tensor, group_size: int) -> "Int4Linear":
        out = cls(weight.shape[1], weight.shape[0], group_size, weight.dtype)
        out.qweight, out.scales_and_zeros = int4_quantize(weight, group_size, weight.dtype)
        return out

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        # row blocks are whole tiles (_BLOCK_ROWS is a multiple of 64), so the packed slice unpacks on its own
        sz = self.scales_and_zeros[:, rows]
        return int4_dequantize(self.qweight[rows], sz, self.group_size, sz.dtype)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        if flat.shape[0] <= KERNEL_MAX_ROWS and _HAS_INT4 and x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size,
                                                               self.scales_and_zeros)
        else:
            out = _blockwise(flat, self.dequantize, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int4 group_size={self.group_size}")


class Int8Embedding(Int8Linear):
    """A token embedding stored as int8 rows with one scale per row; `linear` is the tied LM head.

    One table serves both: a row's scale is the head's per-output-channel scale, so nothing is stored twice."""

    def __init__(self, num_embeddings: int, embedding_dim: int, scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__(embedding_dim, num_embeddings, scale_dtype)

    @classmethod
    def from_weight(cls, weight: Tensor) -> "Int8Embedding":
        out = cls(weight.shape[0], weight.shape[1], weight.dtype)
        out.qweight, out.scales = int8_quantize(weight, weight.dtype)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """ids -> rows in the compute dtype; only the gathered rows are dequantised."""
        return F.embedding(ids, self.qweight).to(self.scales.dtype) * self.scales[ids][..., None]

    def linear(self, x: Tensor) -> Tensor:
        return Int8Linear.forward(self, x)


def _blockwise(x: Tensor, dequantize, out_features: int) -> Tensor:
    """x W^T, dequantising W a block of output rows at a time."""
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, _BLOCK_ROWS):
        rows = slice(start, min(start + _BLOCK_ROWS, out_features))
        out[:, rows] = F.linear(x, dequantize(rows))
    return out


assert _BLOCK_ROWS % INT4_TILE == 0
