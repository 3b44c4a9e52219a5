"""Per-token sparse products (a sparse MLP over a prompt): each activation row against its own rows of W
(`*_pairs`: the up projection) or its own input columns (`int4_matmul_cols_per_row`: the down projection).

Each must compute what the whole-row kernels compute for that row alone, bit for bit (so the tests of those kernels
against gguf / PyTorch's formats carry over), and within float32 summation error of the float64 product of the
dequantised weights. They take float32 activations whatever the activation precision: the MLP uses them only for
prompts longer than kernels.MAX_ROWS, whose dense products are float32 too."""
from __future__ import annotations

import pytest
import torch

from gemma3n import kernels
from gemma3n.quant.formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize

from .test_kernels import GGUF_TYPES, TOL, Q, random_rows, reference_weight, rel_err

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")


def random_pairs(m: int, n: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(activation row, weight row) pairs, in no particular order and with repeats"""
    g = torch.Generator().manual_seed(seed)
    xrows, rows = torch.randint(0, m, (count,), generator=g), torch.randint(0, n, (count,), generator=g)
    return torch.cat([xrows, xrows[:3]]), torch.cat([rows, rows[:3]])


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_pairs(qt, activations, code_path, precision):
    n, k, m = 72, 512, 5
    raw = torch.from_numpy(random_rows(qt, n, k, seed=2))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(3))
    xrows, rows = random_pairs(m, n, 40, seed=4)
    precision("float32")
    full = kernels.gguf_matmul(qt, raw, k, x)
    precision(activations)
    y = kernels.gguf_matmul_pairs(qt, raw, k, x, xrows, rows)
    assert torch.equal(y, full[xrows, rows])
    w = reference_weight(qt, raw.numpy(), n, k)
    assert rel_err(y, (x.double()[xrows] * w[rows]).sum(1)) < TOL


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int8_pairs(scale_dtype, code_path, precision):
    n, k, m = 130, 256, 4
    q, s = int8_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(5)) * 0.05, scale_dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(6))
    xrows, rows = random_pairs(m, n, 50, seed=7)
    precision("float32")
    full = kernels.int8_matmul(q, s, x)
    precision("int8")
    y = kernels.int8_matmul_pairs(q, s, x, xrows, rows)
    assert torch.equal(y, full[xrows, rows])
    w = int8_dequantize(q, s, torch.float32).double()
    assert rel_err(y, (x.double()[xrows] * w[rows]).sum(1)) < TOL


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_rows_pairs(group_size, scale_dtype, code_path):
    n, k, m = 192, 512, 6
    g = torch.Generator().manual_seed(8)
    packed, sz = int4_quantize(torch.randn(n, k, generator=g) * 0.05, group_size, scale_dtype)
    qrows, srows = kernels.int4_rows(packed, sz, group_size)
    x = torch.randn(m, k, generator=g)
    xrows, rows = random_pairs(m, n, 60, seed=9)
    y = kernels.int4_rows_matmul_pairs(qrows, srows, group_size, x, xrows, rows)
    assert torch.equal(y, kernels.int4_rows_matmul(qrows, srows, group_size, x)[xrows, rows])
    w = int4_dequantize(packed, sz, group_size, torch.float32).double()
    assert rel_err(y, (x.double()[xrows] * w[rows]).sum(1)) < TOL


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_cols_per_row(group_size, scale_dtype, code_path):
    """Row i of x is zero outside its own columns (row 2: no columns at all); the product reads only those."""
    n, k, m = 128, 512, 5
    g = torch.Generator().manual_seed(10)
    packed, sz = int4_quantize(torch.randn(n, k, generator=g) * 0.05, group_size, scale_dtype)
    dense_x = torch.randn(m, k, generator=g)
    mask = torch.rand(m, k, generator=g) < 0.1
    mask[2] = False
    x = dense_x * mask
    rows, cols = mask.nonzero(as_tuple=True)
    offsets = torch.zeros(m + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(rows, minlength=m).cumsum(0)
    y = kernels.int4_matmul_cols_per_row(packed, sz, group_size, x, offsets, cols)
    for i in range(m):
        own = cols[offsets[i]:offsets[i + 1]].to(torch.int32)
        assert torch.equal(y[i], kernels.int4_matmul(packed, sz, group_size, x[i:i + 1], own)[0]), f"row {i}"
    assert torch.equal(y[2], torch.zeros(n))
    w = int4_dequantize(packed, sz, group_size, torch.float32).double()
    assert rel_err(y, x.double() @ w.T) < TOL


def test_bad_pairs_and_offsets_are_refused():
    raw = torch.from_numpy(random_rows(Q.Q8_0, 4, 64))
    x = torch.randn(2, 64)
    with pytest.raises(IndexError):
        kernels.gguf_matmul_pairs(Q.Q8_0, raw, 64, x, torch.tensor([0]), torch.tensor([4]))
    with pytest.raises(IndexError):
        kernels.gguf_matmul_pairs(Q.Q8_0, raw, 64, x, torch.tensor([2]), torch.tensor([0]))
    with pytest.raises(ValueError):
        kernels.gguf_matmul_pairs(Q.Q8_0, raw, 64, x, torch.tensor([0, 1]), torch.tensor([0]))
    packed, sz = int4_quantize(torch.randn(64, 64), 32, torch.float32)
    for offsets, cols in (([0, 1], [3]), ([0, 2, 1], [3, 4]), ([1, 1, 2], [3, 4])):
        with pytest.raises(ValueError):
            kernels.int4_matmul_cols_per_row(packed, sz, 32, x, torch.tensor(offsets), torch.tensor(cols))
    with pytest.raises(IndexError):
        kernels.int4_matmul_cols_per_row(packed, sz, 32, x, torch.tensor([0, 1, 1]), torch.tensor([64]))

