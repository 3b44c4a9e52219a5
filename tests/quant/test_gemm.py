"""The library's GEMM for long prompts (gemma3n/kernels/gemm_f32.c) against independent references.

It unpacks int4 tiles / GGUF blocks straight into its panels. The weights it multiplies must be the reference's bit for
bit (PyTorch's int4 unpacking, `gguf.quants.dequantize`): multiplying the identity shows them. Its sums must be the
float64 product to float32 rounding, whatever the shape (rows of x that are not a multiple of its 6-row panels or
its 96-row blocks, inputs that end inside a 512-input run, output rows that end inside a 16-column strip), and each
output must be the same bits however many rows come with it and however many threads run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma3n import kernels
from gemma3n.quant.formats import int4_dequantize, int4_quantize, int8_dequantize, int8_quantize

from .test_kernels import GGUF_TYPES, Q, random_rows, reference_weight

pytestmark = pytest.mark.skipif(kernels.native() is None or not kernels.native().g3n_vectorised(),
                                reason="the GEMM is AVX2 code")


def assert_float32_product(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y = x w^T to float32 rounding: each output within a few ulps of the sum of |x||w| it adds up."""
    ref = x.double() @ w.double().T
    scale = x.double().abs() @ w.double().abs().T
    k = x.shape[1]
    worst = float(((y.double() - ref).abs() / scale.clamp_min(1e-30)).max())
    assert worst < 4 * k ** 0.5 * 2.0 ** -24, f"error {worst:.3g} of the sum of |x w| (k = {k})"


def assert_same_on_one_thread(product, x: torch.Tensor, full: torch.Tensor) -> None:
    """product(x) on one thread gives `full` (what it gave on all of them) bit for bit."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(product(x), full)
    finally:
        torch.set_num_threads(threads)


def identity_columns(k: int) -> torch.Tensor:
    return torch.eye(k, dtype=torch.float32)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group_size, k", [(32, 320), (64, 1536), (128, 1152)])
def test_int4_gemm_multiplies_pytorchs_int4_weights(scale_dtype, group_size, k):
    n = 192
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(k)) * 0.05
    packed, sz = int4_quantize(w, group_size, scale_dtype)
    ref_w = int4_dequantize(packed, sz, group_size, scale_dtype).float()
    # the identity picks each weight out alone: the packed panels hold PyTorch's values exactly
    assert torch.equal(kernels.int4_gemm(packed, sz, group_size, identity_columns(k)), ref_w.T)
    for m in (1, 7, 97):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert_float32_product(kernels.int4_gemm(packed, sz, group_size, x), x, ref_w)


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_gemm_multiplies_pytorchs_int8_weights(scale_dtype):
    n, k = 72, 1064  # a 64-row block and one that ends inside its first strip; a short last run of inputs
    q, scales = int8_quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(1)) * 0.05, scale_dtype)
    ref_w = int8_dequantize(q, scales, scale_dtype).float()
    assert torch.equal(kernels.int8_gemm(q, scales, identity_columns(k)), ref_w.T)
    for m in (5, 97):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert_float32_product(kernels.int8_gemm(q, scales, x), x, ref_w)


@pytest.mark.parametrize("qt", GGUF_TYPES, ids=lambda t: t.name)
def test_gguf_gemm_multiplies_the_files_weights(qt):
    n = 72  # a 64-row block and one that ends inside its first strip
    k = 1280 if qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K) else 1056  # two full runs of 512 inputs and a short one
    raw = random_rows(qt, n, k, seed=2)
    w = reference_weight(qt, raw, n, k).float()
    y = kernels.gguf_gemm(qt, torch.from_numpy(raw), k, identity_columns(k))
    assert torch.equal(y, w.T)
    for m in (5, 97):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        assert_float32_product(kernels.gguf_gemm(qt, torch.from_numpy(raw), k, x), x, w)


@pytest.mark.parametrize("n", [128, 64], ids=["two tiles", "one tile"])
def test_each_output_is_the_same_bits_in_any_batch_and_any_threads(n):
    """With fewer tiles of W than twice the threads, each tile's rows of x are split among the threads as well (one
    64-row tile: LAuReL's left projection): the split must not change an output either."""
    k = 1088
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(3)) * 0.05
    packed, sz = int4_quantize(w, 64, torch.bfloat16)
    raw = torch.from_numpy(random_rows(Q.Q8_0, n, k, seed=4))
    q8, scales = int8_quantize(w, torch.bfloat16)
    x = torch.randn(103, k, generator=torch.Generator().manual_seed(5))
    products = [lambda x: kernels.int4_gemm(packed, sz, 64, x), lambda x: kernels.gguf_gemm(Q.Q8_0, raw, k, x),
                lambda x: kernels.int8_gemm(q8, scales, x)]
    for product in products:
        full = product(x)
        for rows in (slice(0, 1), slice(5, 6), slice(2, 9), slice(40, 103)):
            assert torch.equal(product(x[rows]), full[rows])
        assert_same_on_one_thread(product, x, full)


def test_512_bit_blocks_give_the_same_bits():
    """Where the CPU has AVX-512 the GEMM's blocks take 512-bit vectors (gemm_block_avx512, gemm_block2_avx512)
    and int4 tiles are unpacked 16 rows a vector (int4_pack_strips_avx512, each value rounded to the scale dtype as
    before): the vectors span outputs, never a sum, so every output is the same bits as with the AVX2 code, sparse
    panels (skipped inputs), a last strip narrower than 16 and every int4 scale dtype included."""
    if not kernels.set_avx512(True):
        pytest.skip("this CPU has no AVX-512")
    k, n = 1088, 120  # 120 rows: the last strip is 8 wide
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.05
    raw = torch.from_numpy(random_rows(Q.Q8_0, n, k, seed=6))
    x = torch.randn(50, k, generator=torch.Generator().manual_seed(7))
    x[:, 100:900] = 0  # whole runs of zero inputs: the panels' live lists
    q8, scales = int8_quantize(w, torch.bfloat16)
    w4 = torch.randn(128, k, generator=torch.Generator().manual_seed(8)) * 0.05
    int4 = {dtype: int4_quantize(w4, 64, dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    try:
        for product in (lambda: kernels.gguf_gemm(Q.Q8_0, raw, k, x), lambda: kernels.int8_gemm(q8, scales, x),
                        *[lambda q=q: kernels.int4_gemm(*q, 64, x) for q in int4.values()]):
            wide = product()
            kernels.set_avx512(False)
            assert torch.equal(product(), wide)
            kernels.set_avx512(True)
    finally:
        kernels.set_avx512(True)


def test_a_wide_prompt_is_taken_in_chunks_of_runs_with_each_output_unchanged():
    """A prompt whose panels outgrow the GEMM's chunk of x (GEMM_X_CHUNK_BYTES: here 400 rows of 2592 inputs, about
    0.8 MB a run of 512 inputs, so the six runs go in three chunks) has every tile of W pass over one chunk before the
    next: each output must still be the float32 product, and the bits a short prompt (one chunk) gives it."""
    k, n, m = 2592, 128, 400
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(30)) * 0.05
    packed, sz = int4_quantize(w, 32, torch.bfloat16)
    raw = torch.from_numpy(random_rows(Q.Q8_0, n, k, seed=31))
    cases = [(lambda x: kernels.int4_gemm(packed, sz, 32, x), int4_dequantize(packed, sz, 32, torch.bfloat16)),
             (lambda x: kernels.gguf_gemm(Q.Q8_0, raw, k, x), reference_weight(Q.Q8_0, raw.numpy(), n, k))]
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(32))
    x[:, 700:1300] = torch.where(x[:, 700:1300].abs() < 1.5, 0.0, x[:, 700:1300])  # inputs to skip in some runs
    for product, ref_w in cases:
        full = product(x)
        assert_float32_product(full, x, ref_w.float())
        for rows in (slice(0, 1), slice(3, 9), slice(390, 400)):
            assert torch.equal(product(x[rows]), full[rows])
        assert_same_on_one_thread(product, x, full)


@pytest.mark.parametrize("avx512", [False, True], ids=["avx2", "avx512"])
def test_half_precision_activations_are_read_as_the_floats_they_are(avx512):
    """A bfloat16 / float16 model's activations go in as they are, read while x is packed: every output must be the
    bits the float32 copy of the same x gives (half precision widens to float32 exactly), in every shape the GEMM
    splits: rows past a 6-row panel, a narrow last strip, two strips at a time, several runs of inputs and a short
    last one, a prompt taken in chunks of runs, inputs skipped across a panel (zeros of both signs), an infinity,
    and with AVX2 or 512-bit blocks."""
    if avx512 and not kernels.set_avx512(True):
        pytest.skip("this CPU has no AVX-512")
    kernels.set_avx512(avx512)
    try:
        k = 1088
        w = torch.randn(128, k, generator=torch.Generator().manual_seed(40)) * 0.05
        packed, sz = int4_quantize(w, 64, torch.bfloat16)
        q8, scales = int8_quantize(w[:120], torch.float16)
        raw = torch.from_numpy(random_rows(Q.Q4_K, 120, 1280, seed=41))
        products = [(lambda x: kernels.int4_gemm(packed, sz, 64, x), k),
                    (lambda x: kernels.int8_gemm(q8, scales, x), k),
                    (lambda x: kernels.gguf_gemm(Q.Q4_K, raw, 1280, x), 1280),
                    (lambda x: kernels.f32_gemm(w[:120], x), k)]
        for product, width in products:
            g = torch.Generator().manual_seed(width)
            for m in (103, 400):
                x = torch.randn(m, width, generator=g) * 4
                x[:, 300:700] = torch.where(x[:, 300:700].abs() < 6, 0.0, x[:, 300:700])  # inputs to skip
                x[1::2, 300:700] *= -1  # and zeros of both signs
                x[5, 7] = float("inf")  # an output row of infinities and NaNs
                for dtype in (torch.bfloat16, torch.float16):
                    xh = x.to(dtype)
                    y, expected = product(xh), product(xh.float())
                    assert y.dtype == torch.float32
                    assert torch.equal(y.isnan(), expected.isnan())
                    assert torch.equal(y.nan_to_num(0.0), expected.nan_to_num(0.0))
    finally:
        kernels.set_avx512(True)


def test_inputs_zero_across_a_panel_are_skipped_exactly():
    """x as a sparse MLP's down projection gets it (about 5% of each row non-zero, zeros of both signs): the GEMM
    skips inputs that are zero in all six rows of a panel, and each output is still the float32 product and the same
    value whichever rows share its panel (alone, among these rows, or beside dense rows that leave nothing to skip)."""
    k, n = 1088, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(12)) * 0.05
    packed, sz = int4_quantize(w, 64, torch.bfloat16)
    raw = torch.from_numpy(random_rows(Q.Q4_K, n, 1280, seed=13))
    q8, scales = int8_quantize(w, torch.bfloat16)
    cases = [(lambda x: kernels.int4_gemm(packed, sz, 64, x), int4_dequantize(packed, sz, 64, torch.bfloat16), k),
             (lambda x: kernels.gguf_gemm(Q.Q4_K, raw, 1280, x), reference_weight(Q.Q4_K, raw.numpy(), n, 1280), 1280),
             (lambda x: kernels.int8_gemm(q8, scales, x), int8_dequantize(q8, scales, torch.bfloat16), k)]
    for product, ref_w, width in cases:
        g = torch.Generator().manual_seed(width)
        dense = torch.randn(103, width, generator=g)
        x = torch.where(torch.rand(103, width, generator=g) < 0.05, dense, torch.zeros(()))
        x[::2] = x[::2] * torch.where(dense[::2] < 0, -1.0, 1.0)  # and -0.0 where the sign flips a zero
        full = product(x)
        assert_float32_product(full, x, ref_w.float())
        for rows in (slice(0, 1), slice(7, 8), slice(2, 9), slice(40, 103)):
            assert torch.equal(product(x[rows]), full[rows])
        beside_dense = torch.stack([x, dense], 1).reshape(-1, width)  # each panel: three rows of x, three dense
        assert torch.equal(product(beside_dense)[::2], full)


def test_without_avx2_the_callers_fall_back(monkeypatch):
    """The entry points return None on the portable path, and the layers then dequantise for PyTorch's GEMM."""
    from gemma3n.quant.gguf_modules import GGUFLinear
    from gemma3n.quant.modules import Int4Linear, Int8Linear
    k, n = 512, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6)) * 0.05
    layers = [Int4Linear.from_weight(w.bfloat16(), 64), Int8Linear.from_weight(w.bfloat16()),
              GGUFLinear(torch.from_numpy(random_rows(Q.Q4_K, n, k, seed=7)), int(Q.Q4_K), k, torch.float32)]
    x = torch.randn(300, k, generator=torch.Generator().manual_seed(8))  # more rows than any matrix-vector kernel takes
    inputs = [x.bfloat16(), x.bfloat16(), x]  # the quantised layers of a bfloat16 model take and give bfloat16
    fast = [layer(xi) for layer, xi in zip(layers, inputs)]
    monkeypatch.setattr(kernels, "VECTORISED", False)
    assert kernels.int4_gemm(layers[0].qweight, layers[0].scales_and_zeros, 64, x) is None
    assert kernels.int8_gemm(layers[1].qweight, layers[1].scales, x) is None
    assert kernels.gguf_gemm(int(Q.Q4_K), layers[2].raw, k, x) is None
    plain = [layer(xi) for layer, xi in zip(layers, inputs)]
    for layer, xi, y, y_plain in zip(layers, inputs, fast, plain):
        w = layer.dequantize().float()
        if y.dtype == torch.float32:
            assert_float32_product(y, xi, w)
            assert_float32_product(y_plain, xi, w)
        else:  # both the float32 product rounded to bfloat16: at most one bfloat16 rounding apart
            ref = xi.double() @ w.double().T
            for out in (y, y_plain):
                assert float(((out.double() - ref).abs() / ref.abs().clamp_min(1e-3)).max()) < 2.0 ** -7


def test_layers_hand_prompts_to_the_gemm_from_their_thresholds_on():
    """From INT4_GEMM_MIN_ROWS / past INT8_KERNEL_MAX_ROWS / past kernels.MAX_ROWS rows, each quantised layer's
    output is the GEMM's, rounded to the layer's dtype; below, it is not the GEMM that answers (PyTorch's kernels or
    the matrix-vector ones), so the thresholds, not only the entry points, are what this tests."""
    from gemma3n.quant import modules
    from gemma3n.quant.gguf_modules import GGUFLinear
    k, n = 512, 128
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(9)) * 0.05
    int4 = modules.Int4Linear.from_weight(w.bfloat16(), 64)
    int8 = modules.Int8Linear.from_weight(w.bfloat16())
    gguf = GGUFLinear(torch.from_numpy(random_rows(Q.Q4_K, n, k, seed=10)), int(Q.Q4_K), k, torch.float32)
    cases = [
        (int4, modules.INT4_GEMM_MIN_ROWS, torch.bfloat16,
         lambda x: kernels.int4_gemm(int4.qweight, int4.scales_and_zeros, 64, x)),
        (int8, modules.INT8_KERNEL_MAX_ROWS + 1, torch.bfloat16,
         lambda x: kernels.int8_gemm(int8.qweight, int8.scales, x)),
        (gguf, kernels.MAX_ROWS + 1, torch.float32, lambda x: kernels.gguf_gemm(int(Q.Q4_K), gguf.raw, k, x)),
    ]
    for layer, first, dtype, gemm in cases:
        for rows in (first, first + 7, 150):
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).to(dtype)
            assert torch.equal(layer(x), gemm(x.float()).to(dtype)), (type(layer).__name__, rows)
        x = torch.randn(first - 1, k, generator=torch.Generator().manual_seed(11)).to(dtype)
        y, by_gemm = layer(x), gemm(x.float()).to(dtype)
        assert not torch.equal(y, by_gemm), (type(layer).__name__, first - 1)  # another kernel: other roundings
        w_ref = layer.dequantize().float()
        if dtype == torch.float32:
            assert_float32_product(y, x, w_ref)
        else:  # the float32 product rounded once to bfloat16: within 2^-9 of it, relative to the sum of |x w|
            err = (y.double() - x.double() @ w_ref.double().T).abs() / (x.double().abs() @ w_ref.double().abs().T)
            assert float(err.max()) < 2.0 ** -8, (type(layer).__name__, float(err.max()))


def test_a_gguf_layer_narrower_than_a_strip_leaves_prompts_to_the_row_kernels():
    """AltUp's router has 4 outputs: the GEMM would compute 16 a strip and keep 4, so a GGUF layer narrower than
    GEMM_MIN_OUTPUTS takes any prompt through the row kernels (each row of x as it would be alone)."""
    from gemma3n.quant.gguf_modules import GEMM_MIN_OUTPUTS, GGUFLinear
    k = 512
    for n in (GEMM_MIN_OUTPUTS - 1, GEMM_MIN_OUTPUTS):
        layer = GGUFLinear(torch.from_numpy(random_rows(Q.BF16, n, k, seed=12)), int(Q.BF16), k, torch.float32)
        x = torch.randn(130, k, generator=torch.Generator().manual_seed(13))
        by_rows = torch.cat([kernels.gguf_matmul(int(Q.BF16), layer.raw, k, x[i:i + 1]) for i in range(len(x))])
        by_gemm = kernels.gguf_gemm(int(Q.BF16), layer.raw, k, x)
        assert not torch.equal(by_rows, by_gemm)  # other orders of the additions: the two paths are told apart
        assert torch.equal(layer(x), by_rows if n < GEMM_MIN_OUTPUTS else by_gemm), n
        assert_float32_product(layer(x), x, layer.dequantize())


def test_bad_shapes_are_left_to_the_caller():
    w = torch.randn(64, 96) * 0.05
    packed, sz = int4_quantize(w, 32, torch.bfloat16)
    assert kernels.int4_gemm(packed, sz, 64, torch.randn(20, 96)) is None  # the group does not divide k
    raw = torch.from_numpy(random_rows(Q.F32, 16, 20))
    assert kernels.gguf_gemm(int(Q.F32), raw, 20, torch.randn(20, 20)) is None  # k not a multiple of 8
    assert np.array_equal(raw.numpy(), random_rows(Q.F32, 16, 20))  # nothing written into the weights


def test_groups_with_infinite_or_nan_scales_still_unpack_as_pytorch_does():
    """The bfloat16 rounding has no NaN guard (native.c, round_as8, says why): infinities and NaNs still come out as
    PyTorch's unpacking gives them."""
    w = torch.randn(128, 256, generator=torch.Generator().manual_seed(9)) * 0.05
    packed, sz = int4_quantize(w, 64, torch.bfloat16)
    sz[0, 3, 1] = float("inf")
    sz[1, 70, 0] = float("nan")
    sz[2, 100, 1] = -float("inf")
    ours = kernels.int4_dequantize_t(packed, sz, 64, slice(None)).t().to(torch.bfloat16)
    torch.testing.assert_close(ours, int4_dequantize(packed, sz, 64, torch.bfloat16), rtol=0, atol=0, equal_nan=True)
    # rows with a non-finite value turn every output of theirs NaN or infinite; the others are the finite product
    y = kernels.int4_gemm(packed, sz, 64, identity_columns(256))
    clean = [r for r in range(128) if r not in (3, 70, 100)]
    assert torch.equal(y[:, clean], ours.float().T[:, clean])
    assert not torch.isfinite(y[:, [3, 70, 100]]).any()
