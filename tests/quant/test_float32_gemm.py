"""The library's GEMM over float32 weights (kernels.f32_gemm: an encoder tower's own weights, gemm_f32.c) against
the float64 product (each output within float32 rounding of it), and its own bits across batches, threads, row blocks
and vector widths."""
from __future__ import annotations

import pytest
import torch

from gemma3n import kernels

from .test_gemm import assert_float32_product, assert_same_on_one_thread

vectorised = pytest.mark.skipif(kernels.native() is None or not kernels.native().g3n_vectorised(),
                                reason="the GEMM is AVX2 code")


def randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


@vectorised
@pytest.mark.parametrize("m, k, n", [(1, 520, 64), (7, 1024, 1000), (103, 1536, 1536), (250, 4104, 130)])
def test_float32_weights_multiply_to_float32_rounding(m, k, n):
    """Weights of any row count (a last tile of 40 rows, a last strip of 8, n below one tile), inputs ending inside
    a 512-input run, rows not a multiple of six."""
    w, x = randn(n, k, seed=n, scale=0.05), randn(m, k, seed=m)
    y = kernels.f32_gemm(w, x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert_float32_product(y, x, w)


@vectorised
def test_each_output_is_the_same_bits_in_any_batch_threads_and_width():
    k, n = 1536, 1100
    w, x = randn(n, k, seed=1, scale=0.05), randn(103, k, seed=2)
    x[:, 600:1100] = torch.where(x[:, 600:1100].abs() < 1.0, 0.0, x[:, 600:1100])  # inputs some panels skip
    full = kernels.f32_gemm(w, x)
    for rows in (slice(0, 1), slice(5, 6), slice(2, 9), slice(40, 103)):
        assert torch.equal(kernels.f32_gemm(w, x[rows]), full[rows])
    assert_same_on_one_thread(lambda x: kernels.f32_gemm(w, x), x, full)
    wide = kernels.set_avx512(True)
    try:
        kernels.set_avx512(not wide)
        assert torch.equal(kernels.f32_gemm(w, x), full)
    finally:
        kernels.set_avx512(True)


@vectorised
def test_many_rows_go_in_blocks_with_each_output_unchanged():
    """2100 rows of 1536 inputs: one run of all rows' panels outgrows the GEMM's chunk of x, so the rows are taken
    960 at a time, each tile of W packed again per block. Each output must still be the float32 product, with the
    bits it has when its row comes alone or in a short batch (rows across a block boundary included)."""
    k, n, m = 1536, 192, 2100
    w, x = randn(n, k, seed=3, scale=0.05), randn(m, k, seed=4)
    full = kernels.f32_gemm(w, x)
    assert_float32_product(full, x, w)
    for rows in (slice(0, 1), slice(955, 970), slice(1919, 1925), slice(2094, 2100)):
        assert torch.equal(kernels.f32_gemm(w, x[rows]), full[rows])
    assert_same_on_one_thread(lambda x: kernels.f32_gemm(w, x), x, full)


@vectorised
def test_a_workspace_larger_than_the_kept_one_is_used_and_results_stay_right():
    """x's panels past 64 MB are allocated for the call alone (the thread keeps smaller ones between calls): a
    large product between small ones, each checked."""
    k, n = 1024, 64
    w = randn(n, k, seed=5, scale=0.05)
    small, large = randn(30, k, seed=6), randn(17_000, k, seed=7)  # 17000 x 1024 floats: about 70 MB of panels
    before = kernels.f32_gemm(w, small)
    y = kernels.f32_gemm(w, large)
    assert_float32_product(y[::97], large[::97], w)
    assert torch.equal(kernels.f32_gemm(w, large[:6]), y[:6])
    assert torch.equal(kernels.f32_gemm(w, small), before)


def test_the_gemm_applies_only_where_it_is_meant_to(monkeypatch):
    w, x = randn(1024, 512, seed=8), randn(64, 512, seed=9)
    if kernels.native() is None or not kernels.native().g3n_vectorised():
        assert not kernels.f32_gemm_applies(w, x)
        return
    assert kernels.f32_gemm_applies(w, x)
    assert not kernels.f32_gemm_applies(w, x[:63])  # too few rows
    assert not kernels.f32_gemm_applies(w[:1000], x)  # too few outputs
    assert not kernels.f32_gemm_applies(w.bfloat16(), x.bfloat16())
    assert not kernels.f32_gemm_applies(w.requires_grad_(), x)  # autograd records PyTorch's op
    with torch.no_grad():
        assert kernels.f32_gemm_applies(w, x)
    assert kernels.f32_gemm(randn(1024, 516, seed=10), randn(64, 516, seed=11)) is None  # k not a multiple of 8
    monkeypatch.setattr(kernels, "VECTORISED", False)
    assert not kernels.f32_gemm_applies(w.detach(), x)
    assert kernels.f32_gemm(w.detach(), x) is None
