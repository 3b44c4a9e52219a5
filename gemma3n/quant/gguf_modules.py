"""Linear layers and the tied embedding / LM head computed from GGUF blocks as stored (Q4_K, Q6_K, Q8_0, Q5_0, F16,
...), so a GGUF model reads its quantised bytes per token, as llama.cpp does, instead of a float32 copy four to
eight times larger.

The weight is the file's own bytes (a view of the memory map, [out_features, bytes per row]); the activations
stay float32. Decode and short prompts (up to kernels.MAX_ROWS rows) run the native kernels, which decode the blocks
in registers; longer prompts run the library's GEMM, which decodes 64 rows at a time into its own panels (without
AVX2: a block of output rows dequantised into a cache-sized float32 buffer and multiplied densely). Either way the
result is the float32 product of the dequantised weight (the values `gguf.quants.dequantize` gives, bit for bit)
with x, up to the order of the additions.

Used only when the native library is present (gemma3n.kernels); without it the loader dequantises the file once,
the plain path these modules are tested against.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor, nn

from .. import kernels
from .modules import blockwise_matmul


def raw_rows(data: np.ndarray) -> Tensor:
    """A GGUF tensor's stored bytes as uint8 [rows, bytes per row], sharing memory with the file's map."""
    data = np.asarray(data)
    as_bytes = data.reshape(-1, data.shape[-1]).view(np.uint8) if data.ndim > 1 else data.reshape(1, -1).view(np.uint8)
    with warnings.catch_warnings():  # the map is read-only; nothing ever writes through this view
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(as_bytes)


def supported(ggml_type: int, in_features: int) -> bool:
    """Whether the native kernels compute this GGUF type at this row width (False without the library)."""
    return kernels.native() is not None and kernels.gguf_row_bytes(ggml_type, in_features) > 0


# The library's GEMM computes 16 outputs at a time; a narrower W (AltUp's router: 4) would waste most of each
# product, where the row kernels compute each of its rows once per row of x and waste nothing.
GEMM_MIN_OUTPUTS = 16


class GGUFLinear(nn.Module):
    """y = x W^T with W the GGUF blocks of an [out_features, in_features] weight."""

    def __init__(self, raw: Tensor, ggml_type: int, in_features: int, dtype: torch.dtype):
        super().__init__()
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != kernels.gguf_row_bytes(ggml_type, in_features):
            raise ValueError(f"GGUF rows of type {ggml_type} and width {in_features} do not match bytes "
                             f"{tuple(raw.shape)}")
        self.in_features, self.out_features, self.ggml_type = in_features, raw.shape[0], int(ggml_type)
        self.compute_dtype = dtype
        # a buffer, so that parameter/buffer walks (byte counts, .to()) see the weight; not saved in state dicts
        self.register_buffer("raw", raw, persistent=False)

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        """float32 [rows, in_features] of the stored weight."""
        part = self.raw[rows]
        return kernels.gguf_dequantize(self.ggml_type, part, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self._matmul(x, None)

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """Only the output features `rows` (int64): what sparse MLPs read for their active units."""
        return self._matmul(x, rows)

    def forward_pairs(self, x: Tensor, xrows: Tensor, rows: Tensor) -> Tensor:
        """forward(x)[xrows[e], rows[e]] for each e (1-d), reading only those rows: each token of a prompt against
        its own active units (a sparse MLP's up projection). float32 activations, as forward's products over that
        many rows."""
        flat = x.reshape(-1, self.in_features)
        return kernels.gguf_matmul_pairs(self.ggml_type, self.raw, self.in_features, flat, xrows, rows).to(x.dtype)

    def _matmul(self, x: Tensor, rows: Tensor | None) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        n = self.out_features if rows is None else rows.numel()
        if flat.shape[0] <= kernels.MAX_ROWS or rows is not None or n < GEMM_MIN_OUTPUTS:
            out = kernels.gguf_matmul(self.ggml_type, self.raw, self.in_features, flat, rows)
        else:  # the library's GEMM, decoding the blocks into its panels; else dequantise blocks for PyTorch's
            out = kernels.gguf_gemm(self.ggml_type, self.raw, self.in_features, flat)
            if out is None:
                out = blockwise_matmul(flat.float(), self.dequantize, self.out_features)
        return (out if out.dtype == x.dtype else out.to(x.dtype)).reshape(*x.shape[:-1], n)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, ggml_type={self.ggml_type}"


class GGUFEmbedding(GGUFLinear):
    """A token embedding kept as GGUF blocks; lookups dequantise only their rows, `linear` is the tied LM head."""

    def __init__(self, raw: Tensor, ggml_type: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__(raw, ggml_type, embedding_dim, dtype)
        self.num_embeddings, self.embedding_dim = self.out_features, embedding_dim

    def forward(self, ids: Tensor) -> Tensor:
        flat = ids.reshape(-1)
        if flat.dtype != torch.int64 or not flat.is_contiguous():  # (a decode step's ids need no op here)
            flat = flat.to(torch.int64).contiguous()
        if not kernels.indices_within(flat, self.num_embeddings):
            raise IndexError(f"token id out of range for an embedding of {self.num_embeddings} rows")
        rows = kernels.gguf_dequantize(self.ggml_type, self.raw, self.in_features, flat, checked=True)
        rows = rows if rows.dtype == self.compute_dtype else rows.to(self.compute_dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def linear(self, x: Tensor) -> Tensor:
        return GGUFLinear.forward(self, x)
