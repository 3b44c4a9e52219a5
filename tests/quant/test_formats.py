"""int8 / int4 formats and modules: layouts, documented error bounds, kernel path == dequantised path."""
import pytest
import torch
from torch import nn

from gemma3n.quant import (Int4Embedding, Int4Linear, Int8Embedding, Int8Linear, int4_dequantize, int4_quantize,
                           int8_dequantize, int8_quantize, quantize_module)
from gemma3n.quant.formats import pack_tiles, int4_unpack


def _weight(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_int4_layout_is_the_cpu_kernels_where_they_are_used():
    """Our stored layout is PyTorch's AVX-512 one (64-row tiles); on AVX2 machines PyTorch packs 32-row tiles, and
    its int4 kernel must then never be called on our weights."""
    from gemma3n.quant import modules
    q = torch.randint(0, 16, (192, 256), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed = pack_tiles(q.to(torch.uint8))
    assert torch.equal(int4_unpack(packed), q.to(torch.uint8))
    if hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        same = torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        assert modules._HAS_INT4 == same


def test_int8_error_is_at_most_half_a_step():
    w = _weight(96, 128)
    q, s = int8_quantize(w, torch.float32)
    err = (int8_dequantize(q, s, torch.float32) - w).abs()
    assert q.dtype == torch.int8 and s.shape == (96,)
    assert bool((err <= s[:, None] / 2 + 1e-7).all())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_at_most_half_a_step_per_group(group):
    w = _weight(128, 256)
    packed, sz = int4_quantize(w, group, torch.float32)
    assert packed.shape == (128, 128) and sz.shape == (256 // group, 128, 2)
    err = (int4_dequantize(packed, sz, group, torch.float32) - w).abs().unflatten(1, (-1, group))
    step = sz[..., 0].t()[..., None]
    assert bool((err <= step / 2 + 1e-6).all())
    # the documented typical relative error of min/max int4 on Gaussian weights: ~9% at group 64
    rel = (int4_dequantize(packed, sz, group, torch.float32) - w).norm() / w.norm()
    assert rel < {32: 0.085, 64: 0.095, 128: 0.11}[group]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_float_and_paths_agree(kind, dtype):
    w = _weight(192, 256).to(dtype)
    layer = Int8Linear.from_weight(w) if kind == "int8" else Int4Linear.from_weight(w, 64)
    x = torch.randn(3, 40, 256).to(dtype)
    dense = x.float() @ layer.dequantize().float().t()
    out = layer(x)  # 120 rows: the blockwise path for int8, the kernel for int4
    one = layer(x[:1, :2])  # 2 rows: the kernel
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out.float(), dense, rtol=tol, atol=tol * dense.abs().max().item())
    torch.testing.assert_close(one.float(), dense[:1, :2], rtol=tol, atol=tol * dense.abs().max().item())
    exact = x.float() @ w.float().t()
    bound = 0.02 if kind == "int8" else 0.12  # relative error of the product, from the weight error above
    assert (out.float() - exact).norm() / exact.norm() < bound


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_long_prompts_in_cache_sized_blocks_equal_one_block(kind, monkeypatch):
    """The dense path dequantises blocks of whole tiles sized by bytes; a partial last block, and however many
    blocks, give the values of one block holding the whole weight (up to one bfloat16 rounding, should the GEMM
    order its sums differently for a narrower block)."""
    from gemma3n.quant import modules
    w = _weight(320, 256).to(torch.bfloat16)  # 5 tiles of 64 rows
    layer = Int8Linear.from_weight(w) if kind == "int8" else Int4Linear.from_weight(w, 64)
    x = torch.randn(300, 256).to(torch.bfloat16)  # above both kernels' row limits
    monkeypatch.setattr(modules, "DENSE_BLOCK_BYTES", 1 << 30)
    assert modules.cache_block_rows(256) >= 320
    whole = layer(x)
    one_rounding = dict(rtol=2 ** -7, atol=1e-6)
    monkeypatch.setattr(modules, "DENSE_BLOCK_BYTES", 2 * 64 * 256 * 4)  # two tiles a block: 2 + 2 + 1
    assert modules.cache_block_rows(256) == 128
    torch.testing.assert_close(layer(x), whole, **one_rounding)
    monkeypatch.setattr(modules, "DENSE_BLOCK_BYTES", 1)  # never less than one tile
    assert modules.cache_block_rows(256) == 64
    torch.testing.assert_close(layer(x), whole, **one_rounding)
    dense = x.float() @ layer.dequantize().float().t()
    torch.testing.assert_close(whole.float(), dense, rtol=2e-2, atol=2e-2 * dense.abs().max().item())


@pytest.mark.parametrize("cls", [Int8Embedding, Int4Embedding])
def test_embedding_rows_and_tied_head(cls):
    table = _weight(256, 64)
    emb = cls.from_weight(table) if cls is Int8Embedding else cls.from_weight(table, 32)
    ids = torch.tensor([[0, 5, 63, 64, 255], [31, 32, 33, 200, 7]])
    full = emb.dequantize()
    assert torch.equal(emb(ids), full[ids])
    x = torch.randn(2, 64)
    torch.testing.assert_close(emb.linear(x), x @ full.t(), rtol=1e-4, atol=1e-4)


def test_quantize_module_is_generic():
    """Any module (a tower): its big bias-free linears are swapped, small ones kept; outputs stay close."""
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(128, 256, bias=False), nn.GELU(), nn.Linear(256, 128, bias=False),
                          nn.Linear(128, 8, bias=False)).eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        ref = tower(x)
        quantize_module(tower, "int4", group_size=64)
        out = tower(x)
    assert [type(m).__name__ for m in tower] == ["Int4Linear", "GELU", "Int4Linear", "Linear"]
    assert (out - ref).norm() / ref.norm() < 0.15
    half = quantize_module(nn.Sequential(nn.Linear(4, 4)), "float16")
    assert half[0].weight.dtype == torch.float16
