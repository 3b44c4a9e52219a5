"""Native kernels (gemma3n/kernels) against independent references.

GGUF blocks: `gguf.quants.dequantize` (llama.cpp's Python package) gives the weight; int8 / int4: the PyTorch
formats (gemma3n.quant.formats). Float32-activation kernels must equal the float64 product of that weight with x
to float32 rounding; int8-activation kernels must equal it with x replaced by `round_activations(x)`, whose own
definition (int8 per block of 32, ties to even) is checked against a PyTorch rewrite. Both the AVX2 code and the
portable C code run."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma3n import kernels
from gemma3n.quant import Int4Linear
from gemma3n.quant.formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

pytestmark = pytest.mark.skipif(kernels.native() is None, reason=f"native kernels unavailable: {kernels.why_not()}")

GGUF_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32]
INT8_ACTIVATION_TYPES = [Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q6_K, Q.Q4_K]  # Q4_K only with AVX-512 VNNI (native.c says why)
TOL = 2e-6  # relative to the largest output: float32 sums of up to 1024 terms


def random_rows(qt, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random bytes as GGUF rows, with every float16 scale field set to a finite value (random bytes are a valid
    block for every one of these types otherwise)."""
    rng = np.random.default_rng(seed)
    if qt in (Q.F32, Q.F16, Q.BF16):
        values = rng.standard_normal((n, k)).astype(np.float32)
        if qt == Q.F16:
            return values.astype(np.float16).view(np.uint8).reshape(n, -1)
        if qt == Q.BF16:
            return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n, -1)
        return values.view(np.uint8).reshape(n, -1)
    size, nbytes = gguf.GGML_QUANT_SIZES[qt]
    blocks = rng.integers(0, 256, size=(n, k // size, nbytes), dtype=np.uint8)
    halves = {Q.Q4_0: [0], Q.Q5_0: [0], Q.Q8_0: [0], Q.Q4_1: [0, 2], Q.Q5_1: [0, 2], Q.Q4_K: [0, 2],
              Q.Q5_K: [0, 2], Q.Q6_K: [208]}[qt]
    for offset in halves:
        scale = rng.uniform(-0.05, 0.05, (n, k // size)).astype(np.float16)
        blocks[:, :, offset:offset + 2] = scale.view(np.uint8).reshape(n, k // size, 2)
    return blocks.reshape(n, -1)


def reference_weight(qt, raw: np.ndarray, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, qt), dtype=np.float64)).reshape(n, k)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_dequantize_is_gguf_bit_for_bit(qt, code_path):
    n, k = 24, 512
    raw = random_rows(qt, n, k)
    ref = reference_weight(qt, raw, n, k).float()
    assert torch.equal(kernels.gguf_dequantize(qt, torch.from_numpy(raw), k), ref)
    rows = torch.tensor([5, 0, 23, 5])
    assert torch.equal(kernels.gguf_dequantize(qt, torch.from_numpy(raw), k, rows), ref[rows])


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 3])
def test_gguf_matmul_float_activations(qt, m, code_path, precision):
    precision("float32")
    n, k = 72, 512
    raw = random_rows(qt, n, k, seed=m)
    w = reference_weight(qt, raw, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert rel_err(kernels.gguf_matmul(qt, torch.from_numpy(raw), k, x), x.double() @ w.T) < TOL
    rows = torch.tensor([70, 3, 3, 41])
    assert rel_err(kernels.gguf_matmul(qt, torch.from_numpy(raw), k, x, rows), x.double() @ w[rows].T) < TOL


@pytest.mark.parametrize("qt", [Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [544, 576, 608, 640])
def test_rows_of_an_odd_number_of_blocks(qt, k, code_path, precision):
    """Rows of 17 to 20 blocks of 32 (the 512-bit kernels take Q5_x blocks four at a time and the rest one by one,
    Q4_0 / Q8_0 blocks in pairs): each output within float32 rounding of the float64 product, and a row's bits the
    same alone as in a batch."""
    precision("float32")
    n = 40
    raw = torch.from_numpy(random_rows(qt, n, k, seed=k))
    w = reference_weight(qt, raw.numpy(), n, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    y = kernels.gguf_matmul(qt, raw, k, x)
    assert rel_err(y, x.double() @ w.T) < TOL
    assert torch.equal(kernels.gguf_matmul(qt, raw, k, x[1:2]), y[1:2])


def test_round_activations_definition():
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)) * 3
    x[1, 32:64] = 0  # an all-zero block stays zero
    blocks = x.reshape(3, -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    expected = (torch.round(blocks * inv).clamp(-127, 127) * d).reshape(3, 96)
    assert torch.equal(kernels.round_activations(x), expected)


@pytest.mark.parametrize("qt", [Q.Q4_0, Q.Q5_0], ids=lambda t: t.name)
@pytest.mark.parametrize("k", [544, 576, 608, 640])
def test_int8_activations_rows_of_any_number_of_blocks(qt, k, code_path, precision):
    """Rows of 17 to 20 blocks (with VNNI the int8-activation kernels take blocks four at a time, the rest one by
    one): the product of the dequantised weight with the rounded x, and a row's bits the same alone as in a batch."""
    if not kernels.native().g3n_q8_supported(int(qt)):
        pytest.skip("no AVX2 here: the float kernels run instead")
    precision("int8")
    raw = torch.from_numpy(random_rows(qt, 40, k, seed=k))
    w = reference_weight(qt, raw.numpy(), 40, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(k))
    xr = kernels.round_activations(x) if code_path != "portable" else x  # the portable C has float kernels only
    y = kernels.gguf_matmul(qt, raw, k, x)
    assert rel_err(y, xr.double() @ w.T) < TOL
    assert torch.equal(kernels.gguf_matmul(qt, raw, k, x[1:2]), y[1:2])


@pytest.mark.parametrize("qt", INT8_ACTIVATION_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("m", [1, 2])
def test_gguf_matmul_int8_activations(qt, m, precision):
    if not kernels.native().g3n_q8_supported(int(qt)):
        pytest.skip("no integer kernel for this type on this CPU (AVX2; Q4_K: AVX-512 VNNI): the float one runs")
    precision("int8")
    n, k = 72, 1024
    raw = random_rows(qt, n, k, seed=10 + m)
    w = reference_weight(qt, raw, n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y = kernels.gguf_matmul(qt, torch.from_numpy(raw), k, x)
    assert rel_err(y, kernels.round_activations(x).double() @ w.T) < TOL
    assert rel_err(y, x.double() @ w.T) < 3e-2  # what rounding x to int8 costs, on random data
    rows = torch.tensor([1, 70, 9])
    assert torch.equal(kernels.gguf_matmul(qt, torch.from_numpy(raw), k, x, rows), y[:, rows])


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_rows(activations, scale_dtype, code_path, precision):
    precision(activations)
    w = torch.randn(130, 256, generator=torch.Generator().manual_seed(2)) * 0.05
    q, s = int8_quantize(w, scale_dtype)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3))
    xr = kernels.round_activations(x) if activations == "int8" and code_path != "portable" else x
    ref = xr.double() @ int8_dequantize(q, s, torch.float32).double().T
    y = kernels.int8_matmul(q, s, x)
    assert rel_err(y, ref) < TOL
    rows = torch.tensor([129, 0, 64])
    assert torch.equal(kernels.int8_matmul(q, s, x, rows), y[:, rows])


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_tiles(activations, group_size, scale_dtype, code_path, precision):
    precision(activations)
    w = torch.randn(192, 512, generator=torch.Generator().manual_seed(5)) * 0.05
    packed, sz = int4_quantize(w, group_size, scale_dtype)
    ref_w = int4_dequantize(packed, sz, group_size, torch.float32).double()
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(6))
    int8 = activations == "int8" and code_path != "portable"
    y = kernels.int4_matmul(packed, sz, group_size, x)
    assert rel_err(y, (kernels.round_activations(x) if int8 else x).double() @ ref_w.T) < TOL
    # activation sparsity: only the listed columns are non-zero, and only they are read
    cols = torch.sort(torch.randperm(512, generator=torch.Generator().manual_seed(7))[:26]).values
    xs = torch.zeros_like(x)
    xs[:, cols] = x[:, cols]
    sparse = kernels.int4_matmul(packed, sz, group_size, xs, cols.to(torch.int32))
    dense = kernels.int4_matmul(packed, sz, group_size, xs)
    assert rel_err(sparse, dense.double()) < TOL


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_rows(group_size, scale_dtype, code_path):
    """The row copy of int4 tiles (for sparse MLPs' up projections) holds the same weights: any rows of it, in any
    order and repeated, times x are the float64 product of PyTorch's dequantised rows, to float32 summation."""
    n, k = 192, 512
    g = torch.Generator().manual_seed(11)
    packed, sz = int4_quantize(torch.randn(n, k, generator=g) * 0.05, group_size, scale_dtype)
    w = int4_dequantize(packed, sz, group_size, torch.float32).double()
    qrows, srows = kernels.int4_rows(packed, sz, group_size)
    assert qrows.shape == (n, k // 2) and srows.shape == (n, k // group_size, 2) and srows.dtype == scale_dtype
    x = torch.randn(3, k, generator=g)
    rows = torch.tensor([191, 0, 64, 63, 64, 127, 5])
    y = kernels.int4_rows_matmul(qrows, srows, group_size, x, rows).double()
    exact = x.double() @ w[rows].T
    # the kernel sums q x per group and applies scale and zero after: bound by the terms it adds
    q_abs = 16.0 * sz[:, rows, 0].double().abs().repeat_interleave(group_size, 0)
    bound = (x.double().abs() @ w[rows].abs().T + x.double().abs() @ q_abs) * k * 2.0 ** -24
    assert bool(((y - exact).abs() <= bound).all()), float(((y - exact).abs() / bound).max())
    everything = kernels.int4_rows_matmul(qrows, srows, group_size, x)
    assert torch.equal(everything[:, rows], y.float())
    _assert_batch_invariant(lambda xb: kernels.int4_rows_matmul(qrows, srows, group_size, xb, rows), k)
    with pytest.raises(IndexError):
        kernels.int4_rows_matmul(qrows, srows, group_size, x, torch.tensor([n]))


def test_int4_linear_row_copy_follows_its_weights():
    """Int4Linear.rows_layout: kept while the weights stay, made again once they are loaded or replaced."""
    g = torch.Generator().manual_seed(12)
    first, second = (Int4Linear.from_weight(torch.randn(128, 256, generator=g) * 0.05, 64) for _ in range(2))
    x, rows = torch.randn(2, 256, generator=g), torch.tensor([3, 100, 64])

    def rows_product(lin):
        qrows, srows = lin.rows_layout()
        return kernels.int4_rows_matmul(qrows, srows, 64, x, rows)
    assert rel_err(rows_product(first), first(x)[:, rows].double()) < TOL
    assert first.rows_layout()[0] is first.rows_layout()[0]
    first.load_state_dict(second.state_dict())  # written in place
    assert rel_err(rows_product(first), second(x)[:, rows].double()) < TOL
    first.qweight = torch.zeros_like(first.qweight)  # replaced
    assert torch.equal(first.rows_layout()[0], torch.zeros(128, 128, dtype=torch.uint8))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_native_dequantize_is_the_pytorch_one(scale_dtype, code_path):
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(8))
    packed, sz = int4_quantize(w, 64, scale_dtype)
    native = kernels.int4_dequantize_t(packed, sz, 64, slice(64, 192)).t().to(scale_dtype)
    assert torch.equal(native, int4_dequantize(packed[64:192], sz[:, 64:192], 64, scale_dtype))


def test_bad_rows_are_refused_before_reading():
    raw = torch.from_numpy(random_rows(Q.Q8_0, 4, 64))
    with pytest.raises(IndexError):
        kernels.gguf_matmul(Q.Q8_0, raw, 64, torch.randn(1, 64), torch.tensor([4]))
    with pytest.raises(IndexError):
        kernels.gguf_dequantize(Q.Q8_0, raw, 64, torch.tensor([-1]))


@pytest.mark.parametrize("qt", [t for t in GGUF_TYPES if t not in INT8_ACTIVATION_TYPES or t == Q.Q4_K],
                         ids=lambda t: t.name)
def test_types_without_an_int8_kernel_stay_exact_with_int8_activations(qt, precision):
    """The types with no integer kernel (and Q4_K without AVX-512 VNNI, where its float32 kernel is the faster one):
    opting in to int8 activations leaves their products exact, the same bits as with float32 activations."""
    if qt == Q.Q4_K and kernels.native().g3n_q8_supported(int(qt)):
        pytest.skip("this CPU has AVX-512 VNNI: Q4_K's integer kernel runs (test_gguf_matmul_int8_activations)")
    n, k = 72, 1024
    raw = torch.from_numpy(random_rows(qt, n, k, seed=3))
    x = torch.randn(2, k, generator=torch.Generator().manual_seed(3))
    precision("float32")
    exact = kernels.gguf_matmul(qt, raw, k, x)
    precision("int8")
    assert not kernels.native().g3n_q8_supported(int(qt))
    assert torch.equal(kernels.gguf_matmul(qt, raw, k, x), exact)


def test_real_270m_tensors(request):
    """Every quantised type in the packaged Gemma 3 270M GGUF, one real tensor each."""
    from gemma3n.cli import default_model_path
    reader = gguf.GGUFReader(default_model_path())
    seen = set()
    for t in reader.tensors:
        if t.tensor_type in seen or t.tensor_type == Q.F32 or len(t.shape) != 2:
            continue
        seen.add(t.tensor_type)
        k, n = int(t.shape[0]), min(int(t.shape[1]), 512)
        raw = np.asarray(t.data).reshape(int(t.shape[1]), -1)[:n]
        w = reference_weight(t.tensor_type, raw, n, k)
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1))
        before = kernels.activation_precision()
        try:
            kernels.set_activation_precision("float32")
            assert rel_err(kernels.gguf_matmul(t.tensor_type, torch.from_numpy(raw.copy()), k, x),
                           x.double() @ w.T) < TOL, t.name
        finally:
            kernels.set_activation_precision(before)
    assert {Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q6_K} <= seen


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_matmul_float_activations_of_any_magnitude(qt, code_path, precision):
    """Each output within float32 summation error of the float64 product, measured against sum |w x| of its own
    row, for activations from 2^-90 to 2^60: the kernels that meet weight bytes in place with x scaled by powers of
    two must give the products of the weights' values, whatever the scale of x."""
    precision("float32")
    n, k = 16, 1024
    raw = random_rows(qt, n, k, seed=5)
    w = reference_weight(qt, raw, n, k)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, k, generator=g) * torch.exp2(torch.randint(-90, 61, (4, k), generator=g)).float()
    x[1] = x[1].abs()  # one row of one sign: no cancellation to hide behind
    y = kernels.gguf_matmul(qt, torch.from_numpy(raw), k, x).double()
    exact = x.double() @ w.T
    bound = (x.double().abs() @ w.abs().T) * k * 2.0 ** -24
    assert bool(((y - exact).abs() <= bound).all()), float(((y - exact).abs() / bound).max())


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_int4_tiles_float_activations_of_any_magnitude(scale_dtype, code_path, precision):
    """As for GGUF: within float32 summation error of the float64 product for activations from 2^-90 to 2^60 (the
    tile kernel sums each nibble where it lies, as q 2^s, and scales the sums back by 2^-s)."""
    precision("float32")
    n, k, group_size = 128, 1024, 64
    g = torch.Generator().manual_seed(9)
    packed, sz = int4_quantize(torch.randn(n, k, generator=g) * 0.05, group_size, scale_dtype)
    w = int4_dequantize(packed, sz, group_size, torch.float32).double()
    x = torch.randn(4, k, generator=g) * torch.exp2(torch.randint(-90, 61, (4, k), generator=g)).float()
    x[1] = x[1].abs()
    y = kernels.int4_matmul(packed, sz, group_size, x).double()
    exact = x.double() @ w.T
    # the kernel sums q x per group and applies scale and zero after: bound by the terms it adds
    q_bound = 16.0 * (x.double().abs() @ sz[:, :, 0].double().abs().repeat_interleave(group_size, 0))
    bound = (x.double().abs() @ w.abs().T + q_bound) * k * 2.0 ** -24
    assert bool(((y - exact).abs() <= bound).all()), float(((y - exact).abs() / bound).max())


def _assert_batch_invariant(product, k: int, max_rows: int = 16):
    """product(x) for x [m, k]: row 0 of every batch of 2..max_rows rows has the bits of row 0 alone, and so does
    every row of the largest batch (the server's continuous batch must not change a request's answer)."""
    x = torch.randn(max_rows, k, generator=torch.Generator().manual_seed(21))
    full = product(x)
    for i in range(max_rows):
        assert torch.equal(product(x[i:i + 1])[0], full[i]), f"row {i} of {max_rows}"
    for m in range(2, max_rows):
        assert torch.equal(product(x[:m])[0], full[0]), f"row 0 of {m}"


@pytest.mark.parametrize("activations", ["float32", "int8"])
@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_rows_compute_the_same_bits_in_any_batch(qt, activations, code_path, precision):
    precision(activations)
    n, k = 40, 512
    raw = torch.from_numpy(random_rows(qt, n, k, seed=3))
    _assert_batch_invariant(lambda x: kernels.gguf_matmul(qt, raw, k, x), k)
    rows = torch.tensor([39, 2, 2, 17])
    _assert_batch_invariant(lambda x: kernels.gguf_matmul(qt, raw, k, x, rows), k)


@pytest.mark.parametrize("activations", ["float32", "int8"])
def test_int8_and_int4_rows_compute_the_same_bits_in_any_batch(activations, code_path, precision):
    precision(activations)
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(22)) * 0.05
    q, s = int8_quantize(w, torch.bfloat16)
    _assert_batch_invariant(lambda x: kernels.int8_matmul(q, s, x), 256)
    packed, sz = int4_quantize(w, 64, torch.bfloat16)
    _assert_batch_invariant(lambda x: kernels.int4_matmul(packed, sz, 64, x), 256)
    cols = torch.tensor([0, 3, 63, 64, 65, 200, 255], dtype=torch.int32)  # the sparse MLPs' active inputs
    _assert_batch_invariant(lambda x: kernels.int4_matmul(packed, sz, 64, x, cols), 256)


@pytest.mark.parametrize("k", [256, 277])  # 277: past the 32-wide loop, a 16-wide step and a scalar tail
def test_int8_rows_in_threes_are_the_rows_alone(k, code_path, precision):
    """g3n_int8_matmul meets up to three activation rows per pass over a weight row (dot_i8_x3): each row must keep
    the bits it gets alone, whatever the widths' remainders."""
    precision("float32")
    q, s = int8_quantize(torch.randn(40, k, generator=torch.Generator().manual_seed(23)) * 0.05, torch.bfloat16)
    _assert_batch_invariant(lambda x: kernels.int8_matmul(q, s, x), k, max_rows=7)
    x = torch.randn(7, k, generator=torch.Generator().manual_seed(24))
    assert rel_err(kernels.int8_matmul(q, s, x), x.double() @ int8_dequantize(q, s, torch.float32).double().T) < TOL


def test_every_included_source_is_listed():
    """The cache build's hash, the staleness check and setup.py's depends must know every file native.c includes:
    one left out would keep an old build after that file changed."""
    root = Path(__file__).resolve().parents[2]
    included = re.findall(r'^#include "([^"]+)"', (root / "gemma3n/kernels/native.c").read_text(), flags=re.M)
    assert tuple(included) == kernels.INCLUDED_SOURCES
    setup = (root / "setup.py").read_text()
    assert all(f'"{name}"' in setup for name in included)
