"""Weight-only integer formats: int8 per output channel and int4 group-wise, as plain tensors.

int8: symmetric, q = round(w / s) in [-127, 127], s = max|w_row| / 127, one scale per output row.
int4: asymmetric per group of `group_size` input values, stored the way PyTorch's CPU int4 kernel
(`aten._weight_int4pack_mm_for_cpu`) reads it, so a checkpoint is used straight from its memory map:
  * values q in [0, 15] with w = (q - 8) * scale + zero   (zero = group min + 8 * scale),
  * `qweight` uint8 [N, K/2] in the kernel's tile layout: output rows in tiles of 64; for each tile and input
    column k, 32 bytes whose low nibbles hold rows 0..31 of the tile and high nibbles rows 32..63,
  * `scales_and_zeros` [K / group_size, N, 2] (scale, zero) in the compute dtype.
Packing and unpacking here are pure PyTorch, so the format does not depend on the kernel being present.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT4_TILE = 64  # output rows per tile of the CPU int4 layout
GROUP_SIZES = (32, 64, 128, 256)
_ROWS_PER_CHUNK = 1024  # quantise / dequantise this many output rows at a time to bound temporary memory


def int8_quantize(w: Tensor, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (int8 [N, K], scales [N]); computed in float32 a chunk of rows at a time."""
    q = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], dtype=scale_dtype)
    for start in range(0, w.shape[0], _ROWS_PER_CHUNK):
        rows = w[start:start + _ROWS_PER_CHUNK].float()
        s = (rows.abs().amax(dim=1) / 127.0).to(scale_dtype)
        s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero row: any scale reproduces it exactly
        q[start:start + len(rows)] = torch.round(rows / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start:start + len(rows)] = s
    return q, scales


def int8_dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


def int4_supported(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether a [out, in] weight fits the int4 layout (whole tiles of output rows, whole groups of inputs)."""
    return group_size in GROUP_SIZES and out_features % INT4_TILE == 0 and in_features % group_size == 0


def int4_quantize(w: Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """[N, K] float -> (uint8 [N, K/2] tile-packed, scales_and_zeros [K/g, N, 2])."""
    n, k = w.shape
    if not int4_supported(n, k, group_size):
        raise ValueError(f"int4 needs out_features % {INT4_TILE} == 0 and in_features % group_size == 0 with "
                         f"group_size in {GROUP_SIZES}; got [{n}, {k}] with group_size {group_size}")
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    sz = torch.empty(k // group_size, n, 2, dtype=scale_dtype)
    for start in range(0, n, _ROWS_PER_CHUNK):
        rows = w[start:start + _ROWS_PER_CHUNK].float().unflatten(1, (-1, group_size))  # (n, groups, g)
        lo, hi = rows.amin(dim=2), rows.amax(dim=2)
        scale = ((hi - lo) / 15.0).to(scale_dtype)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zero = (lo + 8.0 * scale.float()).to(scale_dtype)  # rounded first, so q is chosen against the stored pair
        s, z = scale.float()[..., None], zero.float()[..., None]
        q = torch.round((rows - z) / s + 8.0).clamp_(0, 15).to(torch.uint8).flatten(1)
        end = start + q.shape[0]
        packed[start:end] = pack_tiles(q)
        sz[:, start:end, 0], sz[:, start:end, 1] = scale.t(), zero.t()
    return packed, sz


def int4_unpack(packed: Tensor) -> Tensor:
    """uint8 [N, K/2] tile layout -> uint8 [N, K] values in [0, 15]."""
    n, half = packed.shape
    tiles = packed.reshape(n // INT4_TILE, 2 * half, INT4_TILE // 2)  # (tile, k, 32 bytes)
    both = torch.cat((tiles & 0x0F, tiles >> 4), dim=2)  # (tile, k, 64 rows)
    return both.transpose(1, 2).reshape(n, 2 * half)


def pack_tiles(q: Tensor) -> Tensor:
    """uint8 [N, K] values in [0, 15] -> uint8 [N, K/2] tile layout (the inverse of int4_unpack)."""
    n, k = q.shape
    tiles = q.reshape(n // INT4_TILE, INT4_TILE, k).transpose(1, 2)  # (tile, k, 64 rows)
    low, high = tiles[..., :INT4_TILE // 2], tiles[..., INT4_TILE // 2:]
    return (low | (high << 4)).reshape(n, k // 2)


def int4_dequantize(packed: Tensor, sz: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """Back to float [N, K]: (q - 8) * scale + zero per group."""
    q = int4_unpack(packed).to(dtype).unflatten(1, (-1, group_size))  # (N, groups, g)
    scale, zero = sz[..., 0].t().to(dtype)[..., None], sz[..., 1].t().to(dtype)[..., None]
    return ((q - 8) * scale + zero).flatten(1)
