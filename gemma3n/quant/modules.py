"""Quantised replacements for nn.Linear and the tied embedding / LM head.

Decode and short prompts (up to kernels.MAX_ROWS rows) run the native kernels (gemma3n.kernels), which read the packed
weights directly at close to memory speed. Longer prompts run the library's float32 GEMM, which unpacks the weights
straight into its own panels (gemm_f32.c), except int8 up to INT8_KERNEL_MAX_ROWS and int4 below INT4_GEMM_MIN_ROWS
rows, where PyTorch's own weight-only kernels (`aten._weight_int8pack_mm`, `aten._weight_int4pack_mm_for_cpu`) were
measured faster. Without the library (or AVX2), those PyTorch kernels take decode and short prompts, and long ones
dequantise the weight a block of output rows at a time and multiply densely (the temporary is one block, never the
whole matrix); dequantising int4 in PyTorch costs about as much as 250 rows through its kernel, hence
INT4_KERNEL_MAX_ROWS.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..checkpoint.skeleton import uninitialised_meta
from .. import kernels
from .formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize, INT4_TILE


INT8_KERNEL_MAX_ROWS = 32  # up to this many input rows the integer kernels win; above, blockwise dequantisation
INT4_KERNEL_MAX_ROWS = 256
# Beside the library's GEMM (gemm_f32.c), which unpacks int4 into its own panels, PyTorch's int4 kernel wins only
# for short prompts: on an AMD EPYC (Zen 4, AVX2 code) the two crossed between 48 and 64 rows (bench/RESULTS.md).
INT4_GEMM_MIN_ROWS = 49
# float32 bytes of weight dequantised at once on the dense path: a block the GEMM reads back from the cache the
# unpacking just wrote it to (a fixed row count made 64 MiB blocks of 16384-wide rows, read back from memory)
DENSE_BLOCK_BYTES = 4 << 20
_HAS_INT8 = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _torch_int4_reads_our_layout() -> bool:
    """PyTorch's CPU int4 kernel packs 64-row tiles on AVX-512 machines but 32-row tiles on AVX2 ones; our stored
    layout is the 64-row one, so that kernel may only be used where it reads it (probed once at import)."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return False
    from .formats import pack_tiles
    q = torch.randint(0, 16, (INT4_TILE, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    except RuntimeError:
        return False
    return torch.equal(theirs, pack_tiles(q.to(torch.uint8)))


_HAS_INT4 = _torch_int4_reads_our_layout()


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
        if _native(flat):
            out = kernels.int8_matmul(self.qweight, self.scales, flat).to(self.scales.dtype)
        elif flat.shape[0] <= INT8_KERNEL_MAX_ROWS and _HAS_INT8 and x.device.type == "cpu":
            out = torch.ops.aten._weight_int8pack_mm(flat.to(self.scales.dtype), self.qweight, self.scales)
        else:
            out = self._long(flat.to(self.scales.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def _long(self, flat: Tensor) -> Tensor:
        """Long prompts: the library's GEMM, decoding the rows into its panels (the values of `dequantize`); else
        cache-sized blocks dequantised for PyTorch's GEMM."""
        if flat.device.type == "cpu" and kernels.native() is not None:
            fused = kernels.int8_gemm(self.qweight, self.scales, flat)
            if fused is not None:
                return fused.to(flat.dtype)
        return blockwise_matmul(flat, self.dequantize, self.out_features)

    def forward_rows(self, x: Tensor, rows: Tensor) -> Tensor:
        """Only the output features `rows` (int64), reading only their weights: sparse MLPs' active units."""
        flat = x.reshape(-1, self.in_features)
        if _native(flat):
            out = kernels.int8_matmul(self.qweight, self.scales, flat, rows).to(self.scales.dtype)
        else:
            out = F.linear(flat.to(self.scales.dtype), int8_dequantize(self.qweight[rows], self.scales[rows],
                                                                        self.scales.dtype))
        return out.reshape(*x.shape[:-1], rows.numel())

    def forward_pairs(self, x: Tensor, xrows: Tensor, rows: Tensor) -> Tensor | None:
        """forward(x)[xrows[e], rows[e]] for each e (1-d), reading only those rows' weights: each token of a prompt
        against its own active units (a sparse MLP's up projection). float32 activations, as forward's products
        over that many rows. None without the library (the caller computes densely)."""
        flat = x.reshape(-1, self.in_features)
        if flat.device.type != "cpu" or kernels.native() is None:
            return None
        flat = flat.to(self.scales.dtype)
        return kernels.int8_matmul_pairs(self.qweight, self.scales, flat, xrows, rows).to(flat.dtype)

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
        self._rows: tuple | None = None  # (the tensors it was made from, qrows, srows): see rows_layout

    @classmethod
    def from_weight(cls, weight: Tensor, group_size: int) -> "Int4Linear":
        out = cls(weight.shape[1], weight.shape[0], group_size, weight.dtype)
        out.qweight, out.scales_and_zeros = int4_quantize(weight, group_size, weight.dtype)
        return out

    def dequantize(self, rows: slice = slice(None)) -> Tensor:
        # row blocks are whole tiles (see cache_block_rows), so the packed slice unpacks on its own
        if kernels.native() is not None:  # the same float values, unpacked natively (PyTorch's unpack is slow)
            return kernels.int4_dequantize_t(self.qweight, self.scales_and_zeros, self.group_size, rows).t() \
                .to(self.scales_and_zeros.dtype)
        sz = self.scales_and_zeros[:, rows]
        return int4_dequantize(self.qweight[rows], sz, self.group_size, sz.dtype)

    def rows_layout(self) -> tuple[Tensor, Tensor]:
        """The weights one output row after another (kernels.int4_rows: the same values), for products that read
        only some rows: the tiles interleave 64 rows, so reading one reads them all (the native decode step uses
        this for sparse MLPs' up projections). Made on first use and kept, 1/2 byte per weight more memory; made
        again once the weights are replaced or loaded (load_state_dict)."""
        sources = (self.qweight, self.scales_and_zeros)
        if self._rows is None or any(a is not b for a, b in zip(self._rows[0], sources)):
            self._rows = (sources, *kernels.int4_rows(self.qweight, self.scales_and_zeros, self.group_size))
        return self._rows[1], self._rows[2]

    def _load_from_state_dict(self, *args, **kwargs):
        self._rows = None  # the buffers are written in place: a row copy would be stale
        super()._load_from_state_dict(*args, **kwargs)

    def dequantize_float(self, rows: slice = slice(None)) -> Tensor:
        """dequantize(rows) as float32 (the same values): with the library loaded, a transposed view of the natively
        unpacked W^T, without the two copies that rounding to the scale dtype and widening back would make."""
        if kernels.native() is not None:
            return kernels.int4_dequantize_t(self.qweight, self.scales_and_zeros, self.group_size, rows).t()
        return self.dequantize(rows).float()

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)
        fused = self._library_gemm(flat) if flat.shape[0] >= INT4_GEMM_MIN_ROWS else None
        if fused is not None:
            out = fused
        elif _native(flat):
            out = kernels.int4_matmul(self.qweight, self.scales_and_zeros, self.group_size, flat).to(flat.dtype)
        elif flat.shape[0] <= INT4_KERNEL_MAX_ROWS and _HAS_INT4 and x.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size,
                                                               self.scales_and_zeros)
        elif x.device.type == "cpu" and kernels.native() is not None:
            out = self._native_blockwise(flat)
        else:
            out = blockwise_matmul(flat, self.dequantize, self.out_features)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _native_blockwise(self, flat: Tensor) -> Tensor:
        """Long prompts where the library's GEMM does not run (no AVX2): x W^T a cache-sized block of rows at a time,
        the block unpacked natively straight into float32 W^T (values exactly those of `dequantize`, rounded to the
        scale dtype), so PyTorch's GEMM reads it as it is: no transposed copy, no conversion to the scale dtype and
        back (as `blockwise_matmul` would do)."""
        xs = flat.float()
        out = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype)
        step = cache_block_rows(self.in_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, min(start + step, self.out_features))
            w_t = kernels.int4_dequantize_t(self.qweight, self.scales_and_zeros, self.group_size, rows)
            out[:, rows] = torch.mm(xs, w_t)
        return out

    def _library_gemm(self, flat: Tensor) -> Tensor | None:
        """x W^T through the library's GEMM, W unpacked straight into its panels (gemm_f32.c): the values of
        `dequantize`. None where it cannot run (no library, no AVX2, not on the CPU)."""
        if flat.device.type != "cpu" or kernels.native() is None:
            return None
        fused = kernels.int4_gemm(self.qweight, self.scales_and_zeros, self.group_size, flat)
        return None if fused is None else fused.to(flat.dtype)

    def forward_sparse_inputs(self, x: Tensor, cols: Tensor) -> Tensor:
        """x whose only non-zero input features are `cols` (int64, ascending) -> x W^T, reading only those
        columns' weights (sparse MLPs' down projection); the same result as forward(x)."""
        flat = x.reshape(-1, self.in_features)
        if not _native(flat):
            return self.forward(x)
        out = kernels.int4_matmul(self.qweight, self.scales_and_zeros, self.group_size, flat,
                                  cols.to(torch.int32).contiguous())
        return out.to(self.scales_and_zeros.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_sparse_inputs_per_row(self, x: Tensor, offsets: Tensor, cols: Tensor) -> Tensor | None:
        """forward(x) where row i of x (flattened to [M, K]) is zero outside the input features
        cols[offsets[i]:offsets[i + 1]] (ascending), each row reading only its own columns' weights: a sparse MLP's
        down projection over a prompt. float32 activations; None where the library cannot, or where its GEMM's
        512-bit blocks run (they skip the inputs zero across each 6-row panel faster than rows read their own
        columns: 8.2 against 15-19 ms for E2B's 8192-wide down projection at 128 tokens, 30 against 65-119 at
        512): the caller then computes densely."""
        flat = x.reshape(-1, self.in_features)
        if flat.device.type != "cpu" or kernels.native() is None or kernels.avx512():
            return None
        out = kernels.int4_matmul_cols_per_row(self.qweight, self.scales_and_zeros, self.group_size, flat, offsets,
                                               cols)
        return out.to(self.scales_and_zeros.dtype).reshape(*x.shape[:-1], self.out_features)

    def forward_pairs(self, x: Tensor, xrows: Tensor, rows: Tensor) -> Tensor | None:
        """forward(x)[xrows[e], rows[e]] for each e (1-d), reading only those rows of the row copy (`rows_layout`):
        each token of a prompt against its own active units (a sparse MLP's up projection). float32 activations;
        each group's scale and zero applied to its sum, as the decode kernels do (forward's GEMM first rounds each
        weight to the scale dtype). None where the library cannot (the caller computes densely)."""
        flat = x.reshape(-1, self.in_features)
        if flat.device.type != "cpu" or kernels.native() is None or self.group_size % 32:
            return None
        flat = flat.to(self.scales_and_zeros.dtype)
        qrows, srows = self.rows_layout()
        return kernels.int4_rows_matmul_pairs(qrows, srows, self.group_size, flat, xrows, rows).to(flat.dtype)

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


class Int4Embedding(Int4Linear):
    """A token embedding stored as int4 groups (Int4Linear's layout); `linear` is the tied LM head.

    Half the bytes of Int8Embedding, for the tightest memory budgets; the head's error grows accordingly (see
    gemma3n.quant_quality for measured agreement)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int,
                 scale_dtype: torch.dtype = torch.bfloat16):
        super().__init__(embedding_dim, num_embeddings, group_size, scale_dtype)

    @classmethod
    def from_weight(cls, weight: Tensor, group_size: int) -> "Int4Embedding":
        out = cls(weight.shape[0], weight.shape[1], group_size, weight.dtype)
        out.qweight, out.scales_and_zeros = int4_quantize(weight, group_size, weight.dtype)
        return out

    def forward(self, ids: Tensor) -> Tensor:
        """ids -> rows in the compute dtype, unpacking only the gathered rows from their tiles."""
        flat = ids.reshape(-1)
        tiles = self.qweight.view(self.out_features // INT4_TILE, self.in_features, INT4_TILE // 2)
        within = flat % INT4_TILE
        packed = tiles[flat // INT4_TILE, :, within % (INT4_TILE // 2)]  # (n, K): each row's byte per column
        q = torch.where((within < INT4_TILE // 2)[:, None], packed & 0x0F, packed >> 4)
        sz = self.scales_and_zeros[:, flat].transpose(0, 1)  # (n, groups, 2)
        q = q.to(sz.dtype).unflatten(1, (-1, self.group_size))
        rows = ((q - 8) * sz[..., 0:1] + sz[..., 1:2]).flatten(1)
        return rows.reshape(*ids.shape, self.in_features)

    def linear(self, x: Tensor) -> Tensor:
        return Int4Linear.forward(self, x)


class BiasedLinear(nn.Module):
    """A linear with a bias whose weight is quantised: `linear` (bias-free, quantised by the plan) plus the float
    bias. Encoder towers (SigLIP) have biased projections; the decoders have none."""

    def __init__(self, linear: nn.Module, bias: Tensor):
        super().__init__()
        self.linear = linear
        self.bias = nn.Parameter(bias, requires_grad=False)

    @classmethod
    def split(cls, old: nn.Linear) -> "BiasedLinear":
        with uninitialised_meta():
            bare = nn.Linear(old.in_features, old.out_features, bias=False)
        bare.weight = old.weight
        return cls(bare, old.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x)
        return out + self.bias.to(out.dtype)


def _native(flat: Tensor) -> bool:
    return flat.shape[0] <= kernels.MAX_ROWS and flat.device.type == "cpu" and kernels.native() is not None


def cache_block_rows(in_features: int) -> int:
    """Output rows dequantised at once on the dense path: a float32 block of about DENSE_BLOCK_BYTES, in whole int4
    tiles (at least one)."""
    return max(1, DENSE_BLOCK_BYTES // (4 * in_features * INT4_TILE)) * INT4_TILE


def blockwise_matmul(x: Tensor, dequantize, out_features: int) -> Tensor:
    """x W^T, dequantising W `cache_block_rows` output rows at a time.

    On the CPU a 16-bit product is computed in float32 and rounded once: the same products (exact in float32) and
    float32 sums that a bfloat16 GEMM makes, but CPUs without bfloat16 units (AVX2) run it many times faster."""
    wide = x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)
    xs = x.float() if wide else x
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype, device=x.device)
    block_rows = cache_block_rows(x.shape[-1])
    for start in range(0, out_features, block_rows):
        rows = slice(start, min(start + block_rows, out_features))
        w = dequantize(rows)
        out[:, rows] = F.linear(xs, w.float() if wide else w)
    return out
